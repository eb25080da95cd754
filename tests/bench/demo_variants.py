"""One demo variant: the demo's data at a chosen shape scale, pretrain + sft with recipe overrides, accuracy per type.

    python tests/bench/demo_variants.py TAG [--shape-scale 1.75] [--pretrain-steps 150] [--sft-steps 700] \
        [--pre KEY=VALUE ...] [--sft KEY=VALUE ...] [--workdir runs/demo_variants]

How the README's table of demo variants was made (e.g. `--sft stage.lr.vision=3e-4 --shape-scale 2.0`). The sft
run scores 200 held-out questions every 200 steps (`train.eval_generate_every`), so the log shows when each question
type is learnt; the final row (all 400 held-out questions) is appended to WORKDIR/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_tools.demo_data import build_demo_data
from llava_train.demo import FULL, RECIPES, demo_overrides, evaluate_accuracy
from llava_train.recipe import load_recipe
from llava_train.train.trainer import Trainer

IN_LOOP_EVAL = ["train.eval_generate_every=200", "train.eval_generate_samples=200", "train.eval_generate_by=[qtype]",
                "train.eval_generate_max_new_tokens=4"]  # fmt: skip


def run_variant(args) -> dict:
    workdir = Path(args.workdir) / args.tag
    data = Path(args.workdir) / f"data_scale{args.shape_scale}"  # shared by the variants of one scale
    build_demo_data(data, num_train=FULL["num_train"], num_eval=FULL["num_eval"], image_size=48, shape_scale=args.shape_scale)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "data").exists():
        (workdir / "data").symlink_to(data.resolve())
    quiet = ["train.progress_bar=false", "train.log_every=50", "train.eval_every=0"]
    start = time.perf_counter()
    pretrain = load_recipe(RECIPES / "pretrain.yaml", demo_overrides(workdir, "pretrain", args.pretrain_steps) + quiet + args.pre)
    pre_result = Trainer(pretrain).train()
    sft_overrides = demo_overrides(workdir, "sft", args.sft_steps) + quiet + IN_LOOP_EVAL
    sft = load_recipe(RECIPES / "sft.yaml", sft_overrides + [f"stage.init_from={pre_result.checkpoint}"] + args.sft)
    sft_result = Trainer(sft).train()
    seconds = time.perf_counter() - start
    report = evaluate_accuracy(sft_result.checkpoint, workdir / "data" / "eval", template=sft.data.template)
    return {"tag": args.tag, "shape_scale": args.shape_scale, "pretrain_steps": args.pretrain_steps,
            "sft_steps": args.sft_steps, "pre": args.pre, "sft": args.sft, "train_seconds": round(seconds, 1),
            "accuracy": {qtype: round(acc, 3) for qtype, acc in report["accuracy"].items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tag")
    parser.add_argument("--workdir", default="runs/demo_variants")
    parser.add_argument("--shape-scale", type=float, default=1.75)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--sft-steps", type=int, default=700)
    parser.add_argument("--pre", nargs="*", default=[], help="pretrain recipe overrides")
    parser.add_argument("--sft", nargs="*", default=[], help="sft recipe overrides")
    args = parser.parse_args()
    row = run_variant(args)
    print(json.dumps(row))
    with open(Path(args.workdir) / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
