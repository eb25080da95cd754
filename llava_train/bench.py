"""`llava-train bench RECIPE`: run a few steps of a recipe and report where the time goes.

The recipe runs unchanged (same model, data, engine) except: no evaluation, no
checkpoint, GPU-synchronised phase timing, and `--warmup` steps left out of the numbers.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from llava_train.recipe import load_recipe

PHASES = ("data", "vision", "lm_forward", "backward", "optimizer")


def run_bench(recipe_path: str, overrides: list[str], steps: int, warmup: int) -> dict:
    from llava_train.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="llava-bench-") as out:
        forced = [
            f"train.max_steps={warmup + steps}",
            f"train.output_dir={out}",
            "train.log_every=1",
            "train.eval_every=0",
            "train.save_every=0",
            "train.sync_timing=true",
            "train.progress_bar=false",
            "train.wandb.mode=disabled",
            "data.eval=[]",
        ]
        recipe = load_recipe(recipe_path, [*overrides, *forced])
        Trainer(recipe).train(save_final=False)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = [row for row in rows if "loss" in row and row["step"] > warmup]
    if not timed:
        raise ValueError(f"no timed steps: raise --steps (got {steps}) above zero")
    return summarise(timed)


def summarise(rows: list[dict]) -> dict:
    seconds = sum(row["step_time_s"] for row in rows)
    median = lambda key: statistics.median(row.get(key, 0.0) for row in rows)  # noqa: E731
    split = {phase: median(f"time/{phase}_s") for phase in PHASES if phase != "data"}
    split["data"] = median("data_time_s")
    return {
        "steps": len(rows),
        "step_time_s": median("step_time_s"),
        "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in rows) / seconds,
        "supervised_tokens_per_s": sum(r["supervised_tokens"] for r in rows) / seconds,
        "samples_per_s": sum(r["samples_per_s"] * r["step_time_s"] for r in rows) / seconds,
        "split_s": split,
        "peak_memory_gb": max(r["peak_memory_gb"] for r in rows),
        "mfu": median("mfu"),
        "mfu_lm_only": median("mfu_lm_only"),
        "padding_fraction": median("padding_fraction"),
    }


def print_summary(report: dict) -> None:
    print(f"\n{report['steps']} timed steps, median step {report['step_time_s'] * 1000:.1f} ms")
    print(f"  tokens/s {report['tokens_per_s']:,.0f}   supervised tokens/s {report['supervised_tokens_per_s']:,.0f}"
          f"   samples/s {report['samples_per_s']:.2f}")
    print(f"  MFU {report['mfu']:.1%} (LM only {report['mfu_lm_only']:.1%})   peak memory {report['peak_memory_gb']:.2f} GiB"
          f"   padding {report['padding_fraction']:.1%}")
    total = sum(report["split_s"].values()) or 1.0
    print("  step time split (median per step):")
    for phase in PHASES:
        seconds = report["split_s"].get(phase, 0.0)
        print(f"    {phase:<11} {seconds * 1000:9.1f} ms  {seconds / total:6.1%}")
