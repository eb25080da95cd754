"""DPO on the demo task, per reference kind: preference and answer accuracy before/after, step time and memory.

    python tests/bench/bench_dpo.py [--workdir runs/bench_dpo] [--sft-steps 200] [--dpo-steps 200] [--lr 1e-3]
                                    [--sft-weight 1] [--rejected model|drawn] [--kinds ...] [--no-control]

1. Data: the demo's (tests/bench/demo_setup.py pins it: 6000 images at 48 px, shapes x1.75), and preference pairs
   (data_tools/demo_pairs) drawn like the demo's training images: a colour, count, shape or position question,
   chosen = the right answer, rejected = a hallucinated one; train and held-out pairs from disjoint image streams.
   With `--rejected model` (default) the train pairs are relabelled as RLAIF-V labels the model's own responses:
   where the SFT model answers a pair's question wrongly, its answer becomes the rejected one.
2. The SFT model is the demo model (pretrain 150 steps) stopped early (`--sft-steps`, default 200 of the demo's 700),
   so it still answers some questions wrongly: there is something for DPO to fix. DPO from that checkpoint with
   LoRA r 8 on the LM (the only trainable part), beta 0.1, an SFT term on the chosen answer (RPO, `--sft-weight`),
   once per reference kind, each run in its own process:
   `separate` (the SFT checkpoint loaded as a frozen model), `adapters_off` (the policy with its LoRA disabled),
   `precomputed` (`llava-train dpo-precompute` first, timed apart; no reference model).
   The three references are the same function, so the three runs learn the same thing; only cost differs.
   The control: the same steps of LoRA SFT on the SFT data (does DPO beat more of the same training?).
3. Prints one table: preference accuracy on held-out pairs (the policy's own log p(chosen) > log p(rejected)),
   held-out answer accuracy (greedy, exact match) overall and per question type, median step time and peak memory
   (the process's peak RSS on CPU; CUDA's peak allocated on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml
from demo_setup import DATA, PRETRAIN_STEPS, REPO, accuracy, recipe, train

KINDS = ("separate", "adapters_off", "precomputed")


def build_data(workdir: Path, args) -> Path:
    from data_tools.demo_data import build_demo_data
    from data_tools.demo_pairs import build_demo_pairs

    data = workdir / "data"
    build_demo_data(data, **DATA)
    for name, num, seed in (("pairs", args.pairs, 0), ("heldout_pairs", args.heldout_pairs, 1)):
        if not (data / name).is_dir():
            build_demo_pairs(data / name, num_pairs=num, image_size=DATA["image_size"], shape_scale=DATA["shape_scale"],
                             seed=seed, samples_per_shard=250, prefix=name)  # fmt: skip
    return data


def on_policy_pairs(sft: Path, data: Path) -> str:
    """The train pairs relabelled RLAIF-V style: where the SFT model answers a pair's question wrongly, its own
    answer is the rejected one (the hallucination it makes); elsewhere the drawn wrong answer stays.
    Returns the shards' folder name under `data`."""
    from data_tools.convert_records import record_members
    from data_tools.demo_pairs import ANSWERS
    from data_tools.shard_writer import ShardSink
    from llava_train.evaluate.answer import EvalOptions
    from llava_train.evaluate.checkpoint import evaluate_checkpoint
    from llava_train.evaluate.questions import read_records

    name = f"pairs_on_policy_{sft.parent.parent.name}"
    if (data / name).is_dir():
        return name
    pairs = read_records([str(data / "pairs" / "shard-*.tar")])
    shutil.rmtree(data / f"{name}_questions", ignore_errors=True)
    questions = ShardSink(data / f"{name}_questions", "shard", 500, 1 << 30)
    for raw in pairs:
        pair = raw["json"]
        turns = [{"from": "human", "value": pair["prompt"]}, {"from": "gpt", "value": pair["chosen"]}]
        record = {"id": pair["id"], "conversations": turns, "meta": {**pair["meta"], "answer": pair["chosen"]}}
        questions.add(record_members(raw["__key__"], record, [("png", raw["png"])]))
    questions.close()
    out = data / f"{name}_questions" / "eval"
    evaluate_checkpoint(sft, [str(data / f"{name}_questions" / "shard-*.tar")],
                        EvalOptions(batch_size=32, max_new_tokens=8), out_dir=out, progress=False)  # fmt: skip
    said = {row["key"]: row["prediction"] for row in map(json.loads, (out / "predictions.jsonl").open())}
    sink = ShardSink(data / f"{name}.partial", "shard", 250, 1 << 30)
    for raw in pairs:
        pair = dict(raw["json"])
        answer = said[pair["id"]]
        if answer != pair["chosen"] and answer in ANSWERS[pair["meta"]["qtype"]]:
            pair["rejected"] = answer
        sink.add(record_members(raw["__key__"], pair, [("png", raw["png"])]))
    sink.close()
    (data / f"{name}.partial").rename(data / name)  # whole or absent: a rerun reuses only a finished relabelling
    return name


def dpo_recipe(data: Path, out: Path, steps: int, sft: Path, kind: str, args, pairs: str = "pairs") -> dict:
    raw = recipe(data, out, "sft", steps, init_from=sft, lr=args.lr, shards=pairs)
    objective = {"type": "dpo", "beta": args.beta, "sft_weight": args.sft_weight}
    if kind == "separate":
        objective["reference"] = str(sft)
    elif kind == "precomputed":
        objective["precomputed_reference"] = True
    raw = lora_stage(raw)
    raw["stage"]["objective"] = objective
    raw["train"]["micro_batch_size"] = 8
    return raw


def lora_stage(raw: dict) -> dict:
    """LoRA r 8 on the LM, the only trainable part."""
    raw["stage"].update(name="sft_lora", trainable={"vision": False, "connector": False}, lr={},
                        lora={"r": 8, "alpha": 16, "dropout": 0.0})  # fmt: skip
    raw["train"].update(save_every=0, eval_every=0)
    return raw


def llava_train(*args: str) -> float:
    """Run the CLI in a fresh process (its own peak memory); returns the wall time."""
    # Without this process's rendezvous (set up when it trained the SFT model): the child picks its own port.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "LOCAL_WORLD_SIZE")}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llava_train", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llava-train {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def train_in_subprocess(raw: dict, workdir: Path) -> Path:
    """Train `raw` through the CLI in a fresh process (its own peak memory), unless its final checkpoint exists."""
    out = Path(raw["train"]["output_dir"])
    checkpoint = out / "checkpoints" / f"step-{raw['train']['max_steps']}"
    if not checkpoint.is_dir():
        path = workdir / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        llava_train("train", str(path))
    return checkpoint


def step_stats(out: Path, warmup: int = 3) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_time_s" in r]
    return {"step_s": statistics.median(r["step_time_s"] for r in steps[warmup:] or steps),
            "peak_gb": max(r["peak_memory_gb"] for r in steps), "loss": steps[-1]["loss"]}  # fmt: skip


def preference_accuracy(checkpoint: Path, shards: Path, data) -> dict:
    """Share of held-out pairs whose chosen answer the model finds likelier than the rejected one: all, per qtype."""
    import torch

    from llava_train.data import pipeline
    from llava_train.data.shards import ShardStream, expand_urls
    from llava_train.model.io import load_any
    from llava_train.objectives.dpo_precompute import shard_loader, shard_logprobs

    model, tokenizer = load_any(checkpoint)
    encoder = pipeline.make_encoder(data, tokenizer, model, accept_groups=True)
    collate_fn = pipeline.make_collate(tokenizer, model)
    wins = defaultdict(list)
    for shard in expand_urls([f"{shards}/shard-*.tar"]):
        qtypes = {raw["json"]["id"]: raw["json"]["meta"]["qtype"]
                  for raw in ShardStream([shard], lambda raw: raw, shuffle=False, loop=False)}  # fmt: skip
        pairs = shard_logprobs(model, shard_loader(shard, data, 16, encoder, collate_fn), 1024, torch.device("cpu"),
                               autocast=False)  # fmt: skip
        for pair_id, pair in pairs.items():
            win = pair["chosen"]["sum"] > pair["rejected"]["sum"]
            wins["all"].append(win)
            wins[qtypes[pair_id]].append(win)
    return {qtype: sum(w) / len(w) for qtype, w in wins.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench_dpo")
    parser.add_argument("--sft-steps", type=int, default=200, help="SFT steps of the starting model (the demo: 700)")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--heldout-pairs", type=int, default=400)
    parser.add_argument("--dpo-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3, help="DPO's (LoRA) learning rate")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-weight", type=float, default=1.0,
                        help="RPO: an SFT term on the chosen answer (0: plain DPO, which degenerates here: docs)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--rejected", choices=("model", "drawn"), default="model",
                        help="model: the SFT model's own wrong answer where it errs (RLAIF-V); drawn: a random one")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the control: LoRA SFT for the same steps on the SFT data")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = build_data(workdir, args)
    pre = train(recipe(data, workdir / "pretrain", "pretrain", PRETRAIN_STEPS, template="plain"))
    sft = train(recipe(data, workdir / f"sft{args.sft_steps}", "sft", args.sft_steps, init_from=pre))
    from llava_train.recipe import validate_recipe

    recipe_data = validate_recipe(dpo_recipe(data, workdir / "unused", 1, sft, "adapters_off", args)).data

    def scores(checkpoint: Path) -> dict:
        return {"answer": accuracy(checkpoint, data),
                "pref": preference_accuracy(checkpoint, data / "heldout_pairs", recipe_data)}  # fmt: skip

    rows = {"sft (before)": scores(sft)}
    if args.control:  # the same steps of plain SFT (LoRA, same lr) on the SFT data: does DPO beat more training?
        raw = lora_stage(recipe(data, workdir / f"control_sft_lora_lr{args.lr:g}_{args.dpo_steps}", "sft",
                                args.dpo_steps, init_from=sft, lr=args.lr))  # fmt: skip
        checkpoint = train_in_subprocess(raw, workdir)
        rows["sft + LoRA SFT (control)"] = {**scores(checkpoint), **step_stats(Path(raw["train"]["output_dir"]))}
    pairs = on_policy_pairs(sft, data) if args.rejected == "model" else "pairs"
    for kind in args.kinds:
        name = (f"dpo_{kind}_{args.rejected}_lr{args.lr:g}_beta{args.beta:g}_sft{args.sft_weight:g}_"
                f"{args.dpo_steps}")  # fmt: skip
        raw = dpo_recipe(data, workdir / name, args.dpo_steps, sft, kind, args, pairs)
        extra = {}
        if kind == "precomputed":
            path = workdir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(raw))
            extra["precompute_s"] = llava_train("dpo-precompute", str(path))
        checkpoint = train_in_subprocess(raw, workdir)
        rows[f"dpo {kind}"] = {**scores(checkpoint), **step_stats(Path(raw["train"]["output_dir"])), **extra}
    print_table(rows, args, time.perf_counter() - started)
    (workdir / "bench_dpo.json").write_text(json.dumps(rows, indent=1))


def print_table(rows: dict, args, seconds: float) -> None:
    print(f"\nDPO on the demo: {args.pairs} train pairs, {args.dpo_steps} steps x 8 pairs, beta {args.beta:g}, "
          f"SFT weight {args.sft_weight:g}, LoRA r 8, "
          f"lr {args.lr:g}, from the demo model at SFT step {args.sft_steps}; held-out: {args.heldout_pairs} pairs, "
          f"{DATA['num_eval']} questions")
    qtypes = sorted(k for k in rows["sft (before)"]["answer"] if k != "all")
    lines = ["| run | pref acc | " + " | ".join(f"pref {q}" for q in qtypes) + " | answer acc | "
             + " | ".join(qtypes) + " | step s | peak GB | final loss |"]  # fmt: skip
    lines.append("|---" * (5 + 2 * len(qtypes)) + "|")
    for name, r in rows.items():
        pref = " | ".join(f"{r['pref'].get(q, 0):.1%}" for q in qtypes)
        answer = " | ".join(f"{r['answer'].get(q, 0):.1%}" for q in qtypes)
        cost = f"{r['step_s']:.3f} | {r['peak_gb']:.2f} | {r['loss']:.3f}" if "step_s" in r else " | "
        lines.append(f"| {name} | {r['pref']['all']:.1%} | {pref} | {r['answer']['all']:.1%} | {answer} | {cost} |")
    print("\n".join(lines))
    pre = rows.get("dpo precomputed", {})
    if "precompute_s" in pre:
        print(f"precompute (once, reused by every later run): {pre['precompute_s']:.1f} s wall, process start included")
    print(f"total wall time {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
