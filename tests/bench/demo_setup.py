"""The demo's data, model and schedule, pinned for the technique experiments (bench_kd, bench_dpo).

The demo (recipes/demo, llava_train/demo.py) is retuned from time to time; an experiment that builds on it pins
the setup here, so its recorded numbers stay reproducible. Values are recipes/demo's as of this file.
Imported by scripts run as `python tests/bench/NAME.py` (their folder is on sys.path).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Demo data, built with explicit parameters (data_tools/demo_data.build_demo_data).
DATA = dict(num_train=6000, num_eval=400, image_size=48, shape_scale=1.75, samples_per_shard=250, seed=0)
VISION = {"model_type": "clip_vision_model", "image_size": 48, "patch_size": 8, "hidden_size": 128,
          "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4}  # fmt: skip
LM = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
      "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": False}
PRETRAIN_STEPS, SFT_STEPS = 150, 700
PRETRAIN_LR, SFT_LR, VISION_LR = 2e-3, 1e-3, 3e-4  # sft: the tower at a third of the LM's lr


def recipe(data: Path, out: Path, stage: str, steps: int, *, lm: dict = LM, lr: float | None = None,
           template: str = "vicuna_v1", init_from: Path | None = None, objective: dict | None = None,
           seed: int = 0, shards: str | None = None) -> dict:  # fmt: skip
    """A demo-stage recipe: `stage` pretrain (captions, plain template) or sft (questions); `shards` overrides the
    data folder under `data` (default: the stage's)."""
    shards = shards or ("pretrain" if stage == "pretrain" else "sft")
    lrs = {} if stage == "pretrain" else {"vision": VISION_LR}
    return {
        "model": {"vision": {"config": dict(VISION), "feature_layer": -1}, "connector": {"type": "mlp"},
                  "lm": {"config": dict(lm)}, "tokenizer": str(data / "tokenizer")},
        "stage": {"name": stage, "init_from": str(init_from) if init_from else None,
                  "trainable": {"vision": True}, "lr": lrs, "objective": objective or {"type": "lm"}},
        "data": {"train": [str(data / shards / "shard-*.tar")], "template": template, "system_prompt": "",
                 "max_length": 256, "image_mode": "resize"},
        "train": {"output_dir": str(out), "seed": seed, "max_steps": steps, "micro_batch_size": 16,
                  "lr": lr or (PRETRAIN_LR if stage == "pretrain" else SFT_LR), "warmup_ratio": 0.05,
                  "min_lr_ratio": 0.1, "precision": "bf16", "log_every": 1, "keep_last": 1, "progress_bar": False,
                  "wandb": {"mode": "disabled"}},
    }  # fmt: skip


def train(raw: dict) -> Path:
    """Train `raw` in this process, unless its final checkpoint exists (a rerun reuses finished stages)."""
    from llava_train.recipe import validate_recipe
    from llava_train.train.trainer import Trainer

    out = Path(raw["train"]["output_dir"])
    done = out / "checkpoints" / f"step-{raw['train']['max_steps']}"
    if not done.is_dir():
        if Trainer(validate_recipe(raw)).train().preempted:
            sys.exit(f"stopped by a signal during {out}; rerun the same command to continue")
    return done


def accuracy(checkpoint: Path, data: Path) -> dict:
    """Held-out exact-match accuracy of `checkpoint` on the demo's eval questions: overall and per question type."""
    from llava_train.evaluate.answer import EvalOptions
    from llava_train.evaluate.checkpoint import evaluate_checkpoint

    options = EvalOptions(batch_size=32, max_new_tokens=8, by=("qtype",))
    summary = evaluate_checkpoint(checkpoint, [str(data / "eval" / "shard-*.tar")], options, progress=False)
    return {"all": summary["accuracy"], **{k: v["accuracy"] for k, v in summary["by"]["qtype"].items()}}
