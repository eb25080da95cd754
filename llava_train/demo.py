"""The CPU demo: coloured-shape images, a tiny MLLM, LLaVA's two stages, then accuracy per question type.

Everything is made here: images, shards, tokenizer and random-init models from the
config dicts in `recipes/demo/`. The vision tower is random, so `sft` trains it too
(recipes/demo/sft.yaml says so); with a pretrained tower it would stay frozen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llava_train.recipe import load_recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = REPO_ROOT / "recipes" / "demo"

# (train samples per stage, eval samples) for the full demo and for the smoke test.
FULL = {"pretrain_steps": None, "sft_steps": None, "num_train": 6000, "num_eval": 400}
QUICK = {"pretrain_steps": 4, "sft_steps": 6, "num_train": 256, "num_eval": 48}
# Shapes 1.75x the builder's default size: 2-3.5 patches of the tower across, so corners and curves span patches.
SHAPE_SCALE = 1.75


def demo_overrides(workdir: Path, stage: str, steps: int | None) -> list[str]:
    data = workdir / "data"
    overrides = [
        f"model.tokenizer={data / 'tokenizer'}",
        f"data.train=[{data / stage}/shard-*.tar]",
        f"data.eval=[{data / 'eval'}/shard-*.tar]",
        f"train.output_dir={workdir / stage}",
    ]
    if steps is not None:
        overrides += [f"train.max_steps={steps}", "train.progress_bar=false", "train.log_every=1"]
    return overrides


def run_demo(
    workdir: str | Path = "runs/demo", quick: bool = False, shape_scale: float = SHAPE_SCALE,
    pretrain_overrides: list[str] = (), sft_overrides: list[str] = (),
) -> dict:
    """Data, pretrain, sft and the accuracy report; the overrides (recipe key=value) make a variant of the demo
    (tests/bench/demo_variants.py)."""
    from data_tools.demo_data import build_demo_data
    from llava_train.train.trainer import Trainer

    sizes = QUICK if quick else FULL
    workdir = Path(workdir)
    start = time.perf_counter()
    pretrain_overrides = demo_overrides(workdir, "pretrain", sizes["pretrain_steps"]) + list(pretrain_overrides)
    pretrain = load_recipe(RECIPES / "pretrain.yaml", pretrain_overrides)
    image_size = pretrain.model.vision.config["image_size"]  # the recipe's tower decides the pictures' size
    build_demo_data(
        workdir / "data", num_train=sizes["num_train"], num_eval=sizes["num_eval"], image_size=image_size,
        shape_scale=shape_scale,
    )
    pre_result = Trainer(pretrain).train()
    sft_overrides = demo_overrides(workdir, "sft", sizes["sft_steps"]) + [f"stage.init_from={pre_result.checkpoint}", *sft_overrides]
    sft = load_recipe(RECIPES / "sft.yaml", sft_overrides)
    sft_result = Trainer(sft).train()
    train_seconds = time.perf_counter() - start
    report = evaluate_accuracy(sft_result.checkpoint, workdir / "data" / "eval", template=sft.data.template)
    report.update(train_seconds=round(train_seconds, 1), pretrain_loss=pre_result.last_loss, sft_loss=sft_result.last_loss)
    (workdir / "demo_report.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return report


def evaluate_accuracy(checkpoint, eval_dir: Path, template: str, batch_size: int = 32) -> dict:
    """Greedy answers on the held-out questions, scored by `llava-train eval` (normalised exact
    match) per question type; its predictions.jsonl and summary.json go to CHECKPOINT/eval."""
    from llava_train.evaluate.answer import EvalOptions
    from llava_train.evaluate.checkpoint import evaluate_checkpoint

    options = EvalOptions(batch_size=batch_size, max_new_tokens=6, by=("qtype",))
    summary = evaluate_checkpoint(checkpoint, [f"{eval_dir}/shard-*.tar"], options, template=template, progress=False)
    qtypes = summary["by"]["qtype"]
    return {
        "accuracy": {qtype: stats["accuracy"] for qtype, stats in qtypes.items()},
        "eval_questions": {qtype: stats["num"] for qtype, stats in qtypes.items()},
    }


def print_report(report: dict) -> None:
    print("\nheld-out answer accuracy per question type")
    for qtype, acc in report["accuracy"].items():
        print(f"  {qtype:<10} {acc:6.1%}  ({report['eval_questions'][qtype]} questions)")
    print(f"training wall time: {report['train_seconds']:.0f} s")
