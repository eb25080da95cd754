"""The DeepSpeed config of a run: a JSON preset for the ZeRO knobs, the recipe for the rest.

The recipe is the single source of truth for batch sizes, precision, clipping, the ZeRO stage
and offload; a preset (launch/*.json or the user's own) only tunes how ZeRO does its work
(bucket sizes, prefetching, overlap). Optimizer and schedule live in the recipe, so a preset
that defines them is refused rather than silently half-applied.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

from llava_train.recipe import RecipeError, TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent.parent  # holds launch/ in a checkout or editable install
LAUNCH_DIR = REPO_ROOT / "launch"

# What every run needs whatever the preset: DeepSpeed's own step logging off (we log), and
# torch's AdamW accepted under ZeRO and with CPU offload (the recipe builds the optimizer).
_ALWAYS = {
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


def build_ds_config(train_cfg: TrainConfig, world_size: int) -> dict:
    """A complete DeepSpeed config dict for `deepspeed.initialize(config=...)`."""
    if train_cfg.deepspeed_config is not None:
        path = find_preset(train_cfg.deepspeed_config)
    else:
        path = default_preset(train_cfg.zero_stage, train_cfg.offload)
    config = load_preset(path) if path is not None else {}
    for key, value in _ALWAYS.items():
        config.setdefault(key, value)
    _set_batch(config, train_cfg, world_size)
    _set_precision(config, train_cfg.precision, path)
    _set_zero(config, train_cfg, path)
    return config


def default_preset(zero_stage: int, offload: bool) -> Path | None:
    """The shipped preset for a ZeRO stage; stages 0 and 1 need none."""
    if zero_stage == 2:
        return LAUNCH_DIR / "ds_zero2.json"
    if zero_stage == 3:
        return LAUNCH_DIR / ("ds_zero3_offload.json" if offload else "ds_zero3.json")
    return None


def find_preset(name: str) -> Path:
    """Resolve `train.deepspeed_config`: as given (absolute, or relative to the working
    directory), then relative to the repository root, then inside launch/."""
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, REPO_ROOT / given, LAUNCH_DIR / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    shipped = ", ".join(sorted(p.name for p in LAUNCH_DIR.glob("*.json"))) or "none found"
    raise RecipeError(
        f"train.deepspeed_config: preset `{name}` not found (looked at {looked}); "
        f"give a path to a JSON file, or one of the shipped presets in {LAUNCH_DIR}: {shipped}"
    )


def load_preset(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError(f"train.deepspeed_config: {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise RecipeError(f"train.deepspeed_config: {path} must hold a JSON object, got {type(config).__name__}")
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise RecipeError(
                f"train.deepspeed_config: {path} has a `{owned}` section, but the recipe owns the optimizer "
                "and schedule (train.lr, train.betas, train.weight_decay, train.warmup_ratio, "
                f"train.min_lr_ratio, stage.lr.*); delete `{owned}` from the preset"
            )
    return copy.deepcopy(config)


def _set_batch(config: dict, cfg: TrainConfig, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    config["gradient_accumulation_steps"] = cfg.grad_accum
    config["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum * world_size
    config["gradient_clipping"] = cfg.max_grad_norm


def _set_precision(config: dict, precision: str, path: Path | None) -> None:
    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
    if config.get("fp16", {}).get("enabled"):
        # fp16 needs loss scaling the recipe does not configure; bf16 is the supported half precision.
        _warn(f"{path} enables fp16; train.precision={precision} decides, so fp16 is turned off")
    if "fp16" in config:
        config["fp16"] = {**config["fp16"], "enabled": False}


def _set_zero(config: dict, cfg: TrainConfig, path: Path | None) -> None:
    zero = config.setdefault("zero_optimization", {})
    preset_stage = zero.get("stage")
    if path is not None and preset_stage is not None and preset_stage != cfg.zero_stage:
        _warn(
            f"{path} sets zero_optimization.stage={preset_stage} but train.zero_stage={cfg.zero_stage}; "
            f"the recipe wins (set train.zero_stage={preset_stage} to use the preset's stage)"
        )
    zero["stage"] = cfg.zero_stage  # offload without ZeRO never gets here: TrainConfig refuses it
    wanted = {"offload_optimizer": cfg.offload, "offload_param": cfg.offload and cfg.zero_stage == 3}
    for section, want in wanted.items():
        current = zero.get(section) or {}
        active = current.get("device", "none") != "none"
        if want:
            # Keep the preset's tuning (and an nvme device if it chose one); default to pinned CPU memory.
            zero[section] = {"device": "cpu", "pin_memory": True, **(current if active else {})}
        elif active:
            del zero[section]
            reason = "train.offload is false" if not cfg.offload else "parameter offload needs train.zero_stage=3"
            _warn(f"{path} sets zero_optimization.{section}, but {reason}; dropping it")


def _warn(message: str) -> None:
    warnings.warn(f"deepspeed config: {message}", UserWarning, stacklevel=3)
