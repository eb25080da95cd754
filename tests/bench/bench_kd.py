"""LLaVA-KD at small scale: a larger demo teacher, a smaller student, plain training against DPT -> SFT -> DFT.

    python tests/bench/bench_kd.py [--out runs/bench_kd] [--steps 700] [--quick] [--memory-only]

One command, one table (also written to OUT/results.json):
- accuracy per question type of the held-out demo questions for the teacher, the student trained plainly
  (pretrain P steps -> SFT S steps) and the distilled student (DPT P -> SFT S/2 -> DFT S/2: the same step count;
  P = 150 and S = 700 are the demo's schedule, and the teacher is trained like the demo: pretrain P -> SFT S);
- peak memory of the KD loss (forward KL, forward + backward) chunked against naive `[N, V]` logits of both
  models, at a 32k and a 128k vocabulary, each in a fresh process (peak RSS above its inputs);
- the teacher's step-time overhead: median step time of DFT (CE + MDist + RDist, a teacher forward) over SFT.

Demo data is built with explicit parameters (data_tools/demo_data.build_demo_data), so a retune of its defaults
does not change this experiment. Student and teacher share the tower design (36 visual tokens at 48 px) and the
tokenizer; the teacher's LM (the demo's) is twice as wide and twice as deep as the student's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The demo's data, tower and LM (recipes/demo as of this bench), pinned so a retuned demo does not move these numbers:
# the teacher is the demo model, the student's LM is half as wide and half as deep.
DATA = dict(num_train=6000, num_eval=400, image_size=48, shape_scale=1.75, samples_per_shard=250, seed=0)
VISION = {"model_type": "clip_vision_model", "image_size": 48, "patch_size": 8, "hidden_size": 128,
          "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4}
TEACHER_LM = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 688,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 512, "tie_word_embeddings": False}
STUDENT_LM = {**TEACHER_LM, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2}
PRETRAIN_STEPS, PRETRAIN_LR, SFT_LR, VISION_LR = 150, 2e-3, 1e-3, 3e-4  # the demo's schedule
KD = {"type": "kd", "ce_weight": 1.0, "mdist_weight": 1.0, "visual_mdist_weight": 1.0, "rdist_weight": 1.0}


def recipe(data: Path, out: Path, lm: dict, stage: str, steps: int, lr: float, template: str = "vicuna_v1",
           init_from: Path | None = None, objective: dict | None = None, seed: int = 0) -> dict:
    shards = "pretrain" if stage == "pretrain" else "sft"
    lrs = {} if stage == "pretrain" else {"vision": VISION_LR}
    return {
        "model": {"vision": {"config": dict(VISION), "feature_layer": -1}, "connector": {"type": "mlp"},
                  "lm": {"config": dict(lm)}, "tokenizer": str(data / "tokenizer")},
        "stage": {"name": stage, "init_from": str(init_from) if init_from else None,
                  "trainable": {"vision": True}, "lr": lrs, "objective": objective or {"type": "lm"}},
        "data": {"train": [str(data / shards / "shard-*.tar")], "template": template, "system_prompt": "",
                 "max_length": 256, "image_mode": "resize"},
        "train": {"output_dir": str(out), "seed": seed, "max_steps": steps, "micro_batch_size": 16, "lr": lr, "warmup_ratio": 0.05,
                  "min_lr_ratio": 0.1, "precision": "bf16", "log_every": 1, "keep_last": 1, "progress_bar": False,
                  "wandb": {"mode": "disabled"}},
    }


def train(raw: dict) -> Path:
    from llava_train.recipe import validate_recipe
    from llava_train.train.trainer import Trainer

    out = Path(raw["train"]["output_dir"])
    done = out / "checkpoints" / f"step-{raw['train']['max_steps']}"
    if not done.is_dir():  # a rerun reuses finished stages
        if Trainer(validate_recipe(raw)).train().preempted:
            sys.exit(f"stopped by a signal during {out}; rerun the same command to continue")
    return done


def step_times(run: Path) -> float:
    rows = [json.loads(line) for line in (run.parent.parent / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in rows if "step_time_s" in r)


def accuracy(checkpoint: Path, data: Path) -> dict:
    from llava_train.evaluate.answer import EvalOptions
    from llava_train.evaluate.checkpoint import evaluate_checkpoint

    options = EvalOptions(batch_size=32, max_new_tokens=8, by=("qtype",))
    summary = evaluate_checkpoint(checkpoint, [str(data / "eval" / "shard-*.tar")], options, progress=False)
    return {"all": summary["accuracy"], **{k: v["accuracy"] for k, v in summary["by"]["qtype"].items()}}


def experiment(args) -> dict:
    from data_tools.demo_data import build_demo_data

    out = Path(args.out)
    data = out / "data"
    build_demo_data(data, **DATA)
    p, s = min(PRETRAIN_STEPS, args.steps), args.steps
    teacher_pre = train(recipe(data, out / "teacher_pretrain", TEACHER_LM, "pretrain", p, PRETRAIN_LR, "plain"))
    teacher = train(recipe(data, out / "teacher", TEACHER_LM, "sft", s, SFT_LR, init_from=teacher_pre))
    kd = {**KD, "teacher": str(teacher)}
    pre = train(recipe(data, out / "pretrain", STUDENT_LM, "pretrain", p, PRETRAIN_LR, "plain", seed=args.seed))
    plain = train(recipe(data, out / "sft", STUDENT_LM, "sft", s, SFT_LR, init_from=pre, seed=args.seed))
    dpt = train(recipe(data, out / "dpt", STUDENT_LM, "pretrain", p, PRETRAIN_LR, "plain",
                       objective={**kd, "same_template": False}, seed=args.seed))
    kd_sft = train(recipe(data, out / "kd_sft", STUDENT_LM, "sft", s // 2, SFT_LR, init_from=dpt, seed=args.seed))
    dft = train(recipe(data, out / "dft", STUDENT_LM, "sft", s - s // 2, SFT_LR, init_from=kd_sft, objective=kd,
                       seed=args.seed))
    return {
        "accuracy": {"teacher": accuracy(teacher, data), "student (pretrain -> SFT)": accuracy(plain, data),
                     "student (DPT -> SFT -> DFT)": accuracy(dft, data)},
        "step_time_s": {"SFT (CE)": step_times(kd_sft), "DFT (CE + MDist + RDist)": step_times(dft)},
        "steps": {"pretrain / DPT": p, "SFT": s, "SFT + DFT": f"{s // 2} + {s - s // 2}", "teacher pretrain + SFT": f"{p} + {s}"},
    }


# ----------------------------------------------------------------------------- loss memory


def memory_child(variant: str, tokens: int, vocab: int, dim: int) -> dict:
    import psutil
    import torch

    from kernels.distillation import DivergenceSpec, chunked_distillation, naive_distillation

    torch.manual_seed(0)
    hidden = torch.randn(tokens, dim).requires_grad_()
    weight = torch.randn(vocab, dim).mul_(dim**-0.5).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(tokens, 2 * dim), torch.randn(vocab, 2 * dim).mul_((2 * dim) ** -0.5)
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if variant == "naive":
        loss = naive_distillation(hidden, weight, teacher_hidden @ teacher_weight.T, DivergenceSpec())
    else:
        loss = chunked_distillation(hidden, weight, lambda rows: teacher_hidden[rows] @ teacher_weight.T,
                                    DivergenceSpec(), chunk_size=128)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_gib": (peak - baseline) / 2**30, "seconds": time.perf_counter() - start}


def loss_memory(tokens: int, dim: int, vocabs: tuple[int, ...]) -> dict:
    results = {}
    for vocab in vocabs:
        for variant in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--child", variant, str(tokens), str(vocab), str(dim)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
            results[f"{variant} V={vocab // 1000}k"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# ----------------------------------------------------------------------------- report


def memory_table(memory: dict) -> str:
    lines = ["| KD loss (fwd + bwd) | peak above inputs (GiB) | seconds |", "|---|---|---|"]
    return "\n".join(lines + [f"| {k} | {v['peak_gib']:.3f} | {v['seconds']:.2f} |" for k, v in memory.items()])


def table(result: dict) -> str:
    acc = result["accuracy"]
    types = sorted({k for row in acc.values() for k in row if k != "all"})
    lines = ["| model | all | " + " | ".join(types) + " |", "|---" * (len(types) + 2) + "|"]
    for name, row in acc.items():
        lines.append(f"| {name} | {row['all']:.3f} | " + " | ".join(f"{row.get(t, 0):.3f}" for t in types) + " |")
    lines += ["", memory_table(result["memory"])]
    times = result["step_time_s"]
    sft, dft = times["SFT (CE)"], times["DFT (CE + MDist + RDist)"]
    lines += ["", "| step time (median) | s | ratio |", "|---|---|---|",
              f"| SFT (CE) | {sft:.3f} | 1.00 |", f"| DFT (CE + MDist + RDist, teacher forward) | {dft:.3f} | {dft / sft:.2f} |"]
    lines += ["", "steps: " + ", ".join(f"{k} {v}" for k, v in result["steps"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_kd")
    parser.add_argument("--steps", type=int, default=700, help="SFT steps (pretrain/DPT: min(150, steps))")
    parser.add_argument("--tokens", type=int, default=1024, help="rows of the loss-memory measurement")
    parser.add_argument("--seed", type=int, default=0,
                        help="the students' seed; the teacher keeps seed 0, so an OUT holding its finished runs reuses them")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, small vocabularies")
    parser.add_argument("--memory-only", action="store_true", help="only the loss-memory table")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, tokens, vocab, dim = args.child
        print(json.dumps(memory_child(variant, int(tokens), int(vocab), int(dim))))
        return
    sys.path.insert(0, str(REPO))
    if args.quick:
        args.steps = 8
        DATA.update(num_train=200, num_eval=32)
    vocabs = (2048, 4096) if args.quick else (32_000, 128_000)
    memory = loss_memory(256 if args.quick else args.tokens, 256, vocabs)
    if args.memory_only:
        print(memory_table(memory))
        return
    result = {**experiment(args), "memory": memory}
    Path(args.out, "results.json").write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
