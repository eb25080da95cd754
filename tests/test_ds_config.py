"""DeepSpeed configs: presets for ZeRO tuning, the recipe for everything it names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from llava_train.recipe import RecipeError, TrainConfig
from llava_train.train.ds_config import LAUNCH_DIR, build_ds_config

REPO = Path(__file__).resolve().parent.parent
PRESETS = ["ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"]


def train_cfg(**overrides) -> TrainConfig:
    return TrainConfig(output_dir="runs/test", **overrides)


def build(world_size: int = 1, **overrides) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain, consistent recipe must not warn
        return build_ds_config(train_cfg(**overrides), world_size)


def write_preset(tmp_path: Path, config: dict, name: str = "mine.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


# ----------------------------------------------------------------------------- the shipped presets


def test_shipped_presets_are_found_from_the_package():
    assert LAUNCH_DIR == REPO / "launch"
    for name in PRESETS:
        preset = json.loads((LAUNCH_DIR / name).read_text())
        assert "optimizer" not in preset and "scheduler" not in preset
        assert "auto" not in json.dumps(preset)
        zero = preset["zero_optimization"]
        assert zero["overlap_comm"] and zero["contiguous_gradients"] and zero["reduce_bucket_size"] > 0
        assert preset["zero_allow_untested_optimizer"] is True and preset["zero_force_ds_cpu_optimizer"] is False
    zero3 = json.loads((LAUNCH_DIR / "ds_zero3.json").read_text())["zero_optimization"]
    assert zero3["stage3_gather_16bit_weights_on_model_save"] is True
    offload = json.loads((LAUNCH_DIR / "ds_zero3_offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"] == offload["offload_param"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("stage, offload", [(0, False), (1, False), (2, False), (2, True), (3, False), (3, True)])
def test_deepspeed_accepts_every_built_config(stage, offload):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = build(zero_stage=stage, offload=offload, micro_batch_size=2, grad_accum=3)
    parsed = DeepSpeedConfig(config)  # DeepSpeed's own validation (unknown keys are errors there)
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == 6 and parsed.gradient_accumulation_steps == 3


# ----------------------------------------------------------------------------- the recipe's values


def test_batch_precision_and_clipping_come_from_the_recipe():
    config = build(world_size=4, micro_batch_size=8, grad_accum=2, max_grad_norm=0.5, precision="bf16", zero_stage=2)
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 8 * 2 * 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["reduce_bucket_size"] == 200_000_000  # from launch/ds_zero2.json
    assert "optimizer" not in config and "scheduler" not in config


def test_stage_0_and_1_need_no_preset():
    for stage in (0, 1):
        config = build(zero_stage=stage)
        assert config["zero_optimization"] == {"stage": stage}
        assert config["bf16"] == {"enabled": False}
        assert config["zero_allow_untested_optimizer"] is True
        assert config["steps_per_print"] >= 10**9


def test_offload_adds_cpu_sections():
    zero2 = build(zero_stage=2, offload=True)["zero_optimization"]
    assert zero2["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero2  # parameter offload exists only at stage 3
    zero3 = build(zero_stage=3, offload=True)["zero_optimization"]
    assert zero3["offload_optimizer"]["device"] == zero3["offload_param"]["device"] == "cpu"
    assert "offload_optimizer" not in build(zero_stage=3)["zero_optimization"]


def test_offload_without_zero_is_refused_when_the_recipe_loads():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="offload: true needs zero_stage 1, 2 or 3"):
        build(zero_stage=0, offload=True)


def test_building_twice_does_not_share_state():
    first = build(zero_stage=3, micro_batch_size=1)
    first["zero_optimization"]["stage"] = 99
    assert build(zero_stage=3)["zero_optimization"]["stage"] == 3


# ----------------------------------------------------------------------------- user presets


def test_preset_path_relative_to_cwd_then_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # launch/ is not under the working directory here
    config = build(deepspeed_config="launch/ds_zero3.json", zero_stage=3)
    assert config["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000
    own = write_preset(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": 123}})
    assert build(deepspeed_config=own.name, zero_stage=2)["zero_optimization"]["reduce_bucket_size"] == 123


def test_missing_preset_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        build(deepspeed_config="launch/ds_zero9.json")
    message = str(info.value)
    assert "train.deepspeed_config: preset `launch/ds_zero9.json` not found" in message
    assert str(tmp_path / "launch" / "ds_zero9.json") in message and "ds_zero3.json" in message


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_preset_with_optimizer_or_scheduler_is_refused(tmp_path, section):
    path = write_preset(tmp_path, {section: {"type": "AdamW", "params": {}}})
    with pytest.raises(RecipeError, match=f"has a `{section}` section, but the recipe owns"):
        build(deepspeed_config=str(path))


def test_invalid_preset_json_is_a_recipe_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{")
    with pytest.raises(RecipeError, match="bad.json is not valid JSON"):
        build(deepspeed_config=str(path))


def test_recipe_stage_wins_over_the_preset_with_a_warning():
    with pytest.warns(UserWarning, match="zero_optimization.stage=3 but train.zero_stage=2; the recipe wins"):
        config = build_ds_config(train_cfg(deepspeed_config=str(LAUNCH_DIR / "ds_zero3.json"), zero_stage=2), 1)
    assert config["zero_optimization"]["stage"] == 2


def test_preset_offload_is_dropped_when_the_recipe_says_no():
    cfg = train_cfg(deepspeed_config=str(LAUNCH_DIR / "ds_zero3_offload.json"), zero_stage=3, offload=False)
    with pytest.warns(UserWarning, match="train.offload is false; dropping it"):
        zero = build_ds_config(cfg, 1)["zero_optimization"]
    assert "offload_optimizer" not in zero and "offload_param" not in zero


def test_preset_offload_tuning_is_kept(tmp_path):
    nvme = {"device": "nvme", "nvme_path": "/local_nvme", "buffer_count": 8}
    path = write_preset(tmp_path, {"zero_optimization": {"stage": 3, "offload_param": nvme}})
    zero = build(deepspeed_config=str(path), zero_stage=3, offload=True)["zero_optimization"]
    assert zero["offload_param"] == {"pin_memory": True, **nvme}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_preset_fp16_is_turned_off(tmp_path):
    path = write_preset(tmp_path, {"fp16": {"enabled": True, "loss_scale": 0}})
    with pytest.warns(UserWarning, match="enables fp16"):
        config = build_ds_config(train_cfg(deepspeed_config=str(path), precision="bf16"), 1)
    assert config["fp16"]["enabled"] is False and config["bf16"]["enabled"] is True
