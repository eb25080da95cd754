"""End-to-end training on the CPU: loss falls, resume equals the uninterrupted run, checkpoints are complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llava_train.recipe import validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict


def losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def run(demo_data, output_dir, **train):
    recipe = validate_recipe(tiny_recipe_dict(demo_data, output_dir, **train))
    return Trainer(recipe).train()


def test_resumed_run_matches_uninterrupted_run(demo_data, tmp_path):
    full = tmp_path / "full"
    run(demo_data, full, max_steps=6, save_every=3, keep_last=2)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    result = run(demo_data, resumed, max_steps=6, resume="auto")
    assert result.step == 6
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_checkpoint_is_complete_and_pruned(demo_data, tmp_path):
    result = run(demo_data, tmp_path, max_steps=4, save_every=1, keep_last=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-3", "step-4"]
    manifest = json.loads((result.checkpoint / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["complete"] is True
    assert manifest["samples_seen"] == 4 * 4
    for name in ("model/model.safetensors", "model/tokenizer", "recipe.yaml", "rank00000_state.pt", "deepspeed"):
        assert (result.checkpoint / name).exists(), name


def test_init_from_carries_weights_into_the_next_stage(demo_data, tmp_path):
    from safetensors.torch import load_file

    first = run(demo_data, tmp_path / "a", max_steps=2)
    recipe = tiny_recipe_dict(demo_data, tmp_path / "b", max_steps=1, lr=0.0)
    recipe["stage"]["init_from"] = str(first.checkpoint)
    second = Trainer(validate_recipe(recipe)).train()
    before = load_file(str(first.checkpoint / "model" / "model.safetensors"))
    after = load_file(str(second.checkpoint / "model" / "model.safetensors"))
    for key in before:
        assert (before[key] == after[key]).all(), key  # lr=0 keeps the loaded weights


@pytest.mark.slow
def test_demo_shortened_loss_falls(tmp_path):
    from llava_train.demo import run_demo

    report = run_demo(tmp_path, quick=True)
    sft = losses(tmp_path / "sft")
    steps = sorted(sft)
    assert sft[steps[-1]] < sft[steps[0]]
    assert set(report["accuracy"]) == {"colour", "count", "position", "shape"}


def test_gradient_checkpointing_gives_the_same_losses(demo_data, tmp_path):
    recipe = tiny_recipe_dict(demo_data, tmp_path / "ckpt", max_steps=3, log_every=1)
    recipe["model"]["gradient_checkpointing"] = True
    recipe["stage"]["trainable"] = {"vision": True}
    Trainer(validate_recipe(recipe)).train()
    recipe_plain = tiny_recipe_dict(demo_data, tmp_path / "plain2", max_steps=3, log_every=1)
    recipe_plain["stage"]["trainable"] = {"vision": True}
    Trainer(validate_recipe(recipe_plain)).train()
    a, b = losses(tmp_path / "plain2"), losses(tmp_path / "ckpt")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_bf16_autocast_on_cpu_trains_close_to_fp32(demo_data, tmp_path):
    run(demo_data, tmp_path / "fp32", max_steps=2, log_every=1)
    run(demo_data, tmp_path / "bf16", max_steps=2, log_every=1, precision="bf16")
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2), step  # bf16 has an 8-bit mantissa
        assert b[step] != a[step]  # ...and did run in bf16


@pytest.mark.slow
def test_tensorboard_scalars_match_metrics_jsonl(demo_data, tmp_path):
    from tests.test_metrics import tensorboard_scalars

    run(demo_data, tmp_path, max_steps=3, tensorboard=True)
    expected: dict[str, list] = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(key, []).append((row["step"], pytest.approx(value, rel=1e-6, abs=1e-12)))
    assert {"loss", "lr", "tokens_per_s", "mfu", "eval_loss"} <= set(expected)
    assert tensorboard_scalars(tmp_path) == expected  # event files hold float32: equal to 1e-6


def test_missing_tensorboard_stops_before_any_model_is_built(demo_data, tmp_path, monkeypatch):
    import sys

    from llava_train.train.metrics import LoggerUnavailableError

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setattr(Trainer, "_build_model", lambda self: pytest.fail("built a model first"))
    with pytest.raises(LoggerUnavailableError, match="set train.tensorboard=false"):
        run(demo_data, tmp_path, tensorboard=True)


def test_grad_norm_without_zero_equals_zero2s(demo_data, tmp_path):
    """DeepSpeed reports no grad norm without ZeRO in fp32; the trainer's own equals ZeRO-2's."""
    for zero in (0, 2):
        run(demo_data, tmp_path / f"z{zero}", max_steps=2, log_every=1, zero_stage=zero, grad_accum=2)
    norms = {}
    for zero in (0, 2):
        rows = [json.loads(line) for line in (tmp_path / f"z{zero}" / "metrics.jsonl").read_text().splitlines()]
        norms[zero] = [row["grad_norm"] for row in rows if "loss" in row]
    assert all(n is not None and n > 0 for n in norms[0])
    assert norms[0] == pytest.approx(norms[2], rel=1e-4)


def assert_resume_matches(recipe_for, tmp_path: Path, steps: int = 4, at: int = 2):
    """Train `recipe_for(out, **train)` (a validated Recipe, `max_steps=steps`) straight through, saving at step
    `at`; resume a copy of that checkpoint in a fresh folder; the resumed steps' losses must equal the straight
    run's. Returns the straight run's TrainResult."""
    result = Trainer(recipe_for(tmp_path / "full", save_every=at)).train()
    checkpoint = f"step-{at}"
    shutil.copytree(tmp_path / "full" / "checkpoints" / checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint)
    Trainer(recipe_for(tmp_path / "resumed", resume="auto")).train()
    expected, got = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(got) == list(range(at + 1, steps + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    return result
