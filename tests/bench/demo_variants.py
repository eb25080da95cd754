"""One demo variant: `llava-train demo` with another shape scale, step counts or recipe overrides.

    python tests/bench/demo_variants.py TAG [--shape-scale 1.75] [--pretrain-steps 150] [--sft-steps 700] \
        [--pre KEY=VALUE ...] [--sft KEY=VALUE ...] [--workdir runs/demo_variants]

How the README's table of demo variants was made (e.g. `--sft stage.lr.vision=3e-4 --shape-scale 2.0`). The sft
run scores 200 held-out questions every 200 steps (`train.eval_generate_every`, in its metrics.jsonl), so the log
shows when each question type is learnt; the final row (all 400 held-out questions) is appended to
WORKDIR/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava_train.demo import run_demo

IN_LOOP_EVAL = ["train.eval_generate_every=200", "train.eval_generate_samples=200", "train.eval_generate_by=[qtype]",
                "train.eval_generate_max_new_tokens=4"]  # fmt: skip


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
    report = run_demo(
        Path(args.workdir) / args.tag, shape_scale=args.shape_scale,
        pretrain_overrides=[f"train.max_steps={args.pretrain_steps}", *args.pre],
        sft_overrides=[f"train.max_steps={args.sft_steps}", *IN_LOOP_EVAL, *args.sft],
    )
    row = {**vars(args), "train_seconds": report["train_seconds"],
           "accuracy": {qtype: round(acc, 3) for qtype, acc in report["accuracy"].items()}}  # fmt: skip
    print(json.dumps(row))
    with open(Path(args.workdir) / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
