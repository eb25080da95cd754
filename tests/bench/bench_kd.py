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

from demo_setup import DATA, LM as TEACHER_LM, PRETRAIN_STEPS, REPO, accuracy, recipe, train

# The teacher is the demo model (demo_setup pins it); the student's LM is half as wide and half as deep.
STUDENT_LM = {**TEACHER_LM, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2}
KD = {"type": "kd", "ce_weight": 1.0, "mdist_weight": 1.0, "visual_mdist_weight": 1.0, "rdist_weight": 1.0}


def step_times(run: Path) -> float:
    rows = [json.loads(line) for line in (run.parent.parent / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in rows if "step_time_s" in r)


def experiment(args) -> dict:
    from data_tools.demo_data import build_demo_data

    out = Path(args.out)
    data = out / "data"
    build_demo_data(data, **DATA)
    p, s = min(PRETRAIN_STEPS, args.steps), args.steps
    teacher_pre = train(recipe(data, out / "teacher_pretrain", "pretrain", p, template="plain"))
    teacher = train(recipe(data, out / "teacher", "sft", s, init_from=teacher_pre))
    kd = {**KD, "teacher": str(teacher)}
    student = dict(lm=STUDENT_LM, seed=args.seed)
    pre = train(recipe(data, out / "pretrain", "pretrain", p, template="plain", **student))
    plain = train(recipe(data, out / "sft", "sft", s, init_from=pre, **student))
    dpt = train(recipe(data, out / "dpt", "pretrain", p, template="plain", objective={**kd, "same_template": False},
                       **student))  # fmt: skip
    kd_sft = train(recipe(data, out / "kd_sft", "sft", s // 2, init_from=dpt, **student))
    dft = train(recipe(data, out / "dft", "sft", s - s // 2, init_from=kd_sft, objective=kd, **student))
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
