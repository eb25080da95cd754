"""Faults: non-finite losses, damaged or foreign checkpoints, a full disk, `kill -9` mid-step and
mid-checkpoint. The 2-process tests run `torchrun -m llava_train train` for real."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from safetensors.torch import load_file

from llava_train.objectives import OBJECTIVES
from llava_train.recipe import Recipe, validate_recipe
from llava_train.train import checkpoint as ckpt
from llava_train.train import trainer as trainer_module
from llava_train.train.engine import cosine_with_warmup
from llava_train.train.faults import NonFiniteLossError
from llava_train.train.resume_check import _MUST_MATCH
from llava_train.train.trainer import Trainer
from tests import faultlib
from tests.conftest import tiny_recipe_dict


def recipe(demo_data, output_dir, **train) -> dict:
    train = {"log_every": 1, "min_lr_ratio": 1.0, **train}  # constant lr: runs of any length share a trajectory
    r = tiny_recipe_dict(demo_data, output_dir, **train)
    r["data"]["eval"] = []  # every forward is a training forward: NaN injection counts them
    return r


def run(r: dict):
    return Trainer(validate_recipe(r)).train()


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model" / "model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    changed = [key for key in a if not torch.equal(a[key], b[key])]
    assert not changed, changed[:5]


# ----------------------------------------------------------------------------- non-finite loss


@pytest.mark.parametrize("how", ["mul", "add"])
@pytest.mark.parametrize("zero", [0, 2, 3])
def test_nonfinite_loss_skips_the_update_and_training_goes_on(demo_data, tmp_path, monkeypatch, zero, how):
    # grad_accum=2 and NaN in the *second* micro-batch of step 2: the first one's gradient is
    # already accumulated inside DeepSpeed and must be dropped as well.
    monkeypatch.setitem(OBJECTIVES, "lm", faultlib.poisoned(OBJECTIVES["lm"], {4}, how))
    r = recipe(demo_data, tmp_path, max_steps=3, grad_accum=2, zero_stage=zero, save_every=1, keep_last=3)
    r["train"]["min_lr_ratio"] = 0.0  # a decaying schedule, to see that it stays in step
    run(r)
    rows = faultlib.metrics(tmp_path)
    assert rows[2]["loss"] is None  # NaN, logged as null
    assert [rows[s]["nonfinite_skipped"] for s in (1, 2, 3)] == [0, 1, 1]
    assert rows[3]["loss"] is not None
    expected_lr = [1e-3 * cosine_with_warmup(s - 1, total=3, warmup=0, min_ratio=0.0) for s in (1, 2, 3)]
    assert [rows[s]["lr"] for s in (1, 2, 3)] == pytest.approx(expected_lr)  # the skip kept the schedule in step
    step1, step2, step3 = (tmp_path / "checkpoints" / f"step-{s}" for s in (1, 2, 3))
    # Nothing moved in the skipped step: weights, fp32 masters, Adam moments, Adam's step count.
    assert_same_tensors(weights(step1), weights(step2))
    assert_same_tensors(faultlib.deepspeed_tensors(step1), faultlib.deepspeed_tensors(step2))
    # ...and the next step trained normally, with finite weights.
    after = weights(step3)
    assert any(not torch.equal(after[k], weights(step2)[k]) for k in after)
    assert all(torch.isfinite(t).all() for t in after.values())


def test_too_many_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(demo_data, tmp_path, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "lm", faultlib.poisoned(OBJECTIVES["lm"], set(range(4, 100))))
    r = recipe(demo_data, tmp_path, max_steps=20, save_every=2, max_bad_steps=3)
    with pytest.raises(NonFiniteLossError) as info:
        run(r)
    message = str(info.value)
    assert "3 steps in a row, steps 4 to 6" in message
    assert "stopping at step 6" in message
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step-2'}" in message
    assert "train.max_bad_steps=3" in message and "train.lr" in message
    # a checkpoint written during the streak (step 4) is not called good
    assert (tmp_path / "checkpoints" / "step-4").is_dir()


def test_a_good_step_resets_the_streak(demo_data, tmp_path, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "lm", faultlib.poisoned(OBJECTIVES["lm"], {2, 3, 5, 6}))
    result = run(recipe(demo_data, tmp_path, max_steps=7, max_bad_steps=3))
    assert result.step == 7
    assert faultlib.metrics(tmp_path)[7]["nonfinite_skipped"] == 4


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_both(demo_data, tmp_path):
    r = recipe(demo_data, tmp_path / "out", max_steps=4, grad_accum=2, zero_stage=3, save_every=1, keep_last=4)
    cmd = faultlib.torchrun_cmd(faultlib.write_recipe(r, tmp_path), script=faultlib.NAN_TRAIN)
    proc = faultlib.run_job(cmd, tmp_path, NAN_RANK="1", NAN_CALLS="6")  # step 3, second micro-batch
    assert proc.returncode == 0, (tmp_path / "job.log").read_text()[-4000:]
    out = tmp_path / "out"
    assert [faultlib.metrics(out)[s]["nonfinite_skipped"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    step2, step3 = (out / "checkpoints" / f"step-{s}" for s in (2, 3))
    assert_same_tensors(weights(step2), weights(step3))
    assert_same_tensors(faultlib.deepspeed_tensors(step2), faultlib.deepspeed_tensors(step3))  # both ranks' files


# ----------------------------------------------------------------------------- refused checkpoints


@pytest.fixture
def saved_run(demo_data, tmp_path):
    """A finished 2-step run with a checkpoint at step 2."""
    out = tmp_path / "run"
    run(recipe(demo_data, out, max_steps=2))
    return out


@pytest.fixture
def engine_spy(monkeypatch):
    """Records whether a DeepSpeed engine was built: refusals must come before that."""
    built = []
    real = trainer_module.initialize_engine
    monkeypatch.setattr(trainer_module, "initialize_engine", lambda *a, **k: built.append(1) or real(*a, **k))
    return built


def resume(demo_data, out, **train):
    return Trainer(validate_recipe(recipe(demo_data, out, max_steps=4, resume="auto", **train)))


def test_truncated_checkpoint_is_refused(demo_data, saved_run, engine_spy):
    (saved_run / "checkpoints" / "step-2" / "rank00000_state.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="is truncated: rank00000_state.pt is missing"):
        resume(demo_data, saved_run)
    assert not engine_spy


def test_checkpoint_with_a_short_file_is_refused(demo_data, saved_run, engine_spy):
    weights_file = saved_run / "checkpoints" / "step-2" / "model" / "model.safetensors"
    size = weights_file.stat().st_size
    with open(weights_file, "r+b") as handle:  # a copy that was cut short
        handle.truncate(size // 2)
    with pytest.raises(ckpt.CheckpointError) as info:
        resume(demo_data, saved_run)
    assert f"model/model.safetensors has {size // 2} bytes, the manifest says {size}" in str(info.value)
    assert not engine_spy


def test_checkpoint_from_another_recipe_is_refused(demo_data, saved_run, engine_spy):
    r = recipe(demo_data, saved_run, max_steps=4, resume="auto")
    r["model"]["lm"]["config"]["num_hidden_layers"] = 3
    r["stage"]["name"] = "pretrain"
    with pytest.raises(ckpt.CheckpointError) as info:
        Trainer(validate_recipe(r))
    message = str(info.value)
    assert "was written by a different recipe" in message
    assert "model.lm.config.num_hidden_layers is 2 there, 3 here" in message
    assert "stage.name is 'sft' there, 'pretrain' here" in message
    assert "stage.init_from=" in message and "recipe.yaml" in message
    assert not engine_spy


def test_every_field_a_resume_must_match_is_a_recipe_field():
    """A dotted path that no schema has would never be compared, so it would guard nothing."""
    for dotted in _MUST_MATCH:
        section = Recipe
        for key in dotted.split("."):
            assert section is not None and key in section.model_fields, f"{dotted}: no `{key}` in the recipe schema"
            annotation = section.model_fields[key].annotation
            section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def test_checkpoint_that_does_not_fit_the_model_is_refused(demo_data, tmp_path, engine_spy):
    # The same recipe, but the pretrained LM folder it names now holds a wider model.
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY_LM

    def save_lm(hidden: int) -> None:
        config = AutoConfig.for_model(**{**TINY_LM, "hidden_size": hidden})
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "lm")

    def lm_recipe(**train):
        r = recipe(demo_data, tmp_path / "run", **train)
        r["model"]["lm"] = {"path": str(tmp_path / "lm")}
        return r

    save_lm(64)
    run(lm_recipe(max_steps=1))
    engine_spy.clear()
    save_lm(128)
    with pytest.raises(ckpt.CheckpointError) as info:
        Trainer(validate_recipe(lm_recipe(max_steps=2, resume="auto")))
    message = str(info.value)
    assert "does not fit the model this recipe builds" in message
    assert "(1024, 64) in the checkpoint, (1024, 128) in this model" in message
    assert not engine_spy


def test_checkpoint_from_another_world_size_is_refused(demo_data, saved_run, engine_spy):
    manifest_file = saved_run / "checkpoints" / "step-2" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "world_size": 2}))
    with pytest.raises(ckpt.CheckpointError, match="written by 2 ranks but this run has 1"):
        resume(demo_data, saved_run)
    assert not engine_spy


# ----------------------------------------------------------------------------- disk full


def test_no_space_before_saving_keeps_the_previous_checkpoint(demo_data, saved_run, monkeypatch):
    previous = saved_run / "checkpoints" / "step-2"
    before = {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    size = sum(json.loads((previous / "manifest.json").read_text())["files"].values())
    trainer = resume(demo_data, saved_run)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=size // 3))
    with pytest.raises(ckpt.DiskFullError) as info:
        trainer.train()
    message = str(info.value)
    assert f"save checkpoint step-4 in {saved_run / 'checkpoints'}" in message
    assert f"needs about {ckpt.format_bytes(size)} (the size of step-2)" in message
    assert f"{ckpt.format_bytes(size // 3)} are free" in message
    assert f"{previous} is intact" in message
    assert sorted(p.name for p in (saved_run / "checkpoints").iterdir()) == ["step-2"]
    assert {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()} == before


def test_disk_full_while_writing_removes_the_partial_folder(demo_data, saved_run, monkeypatch):
    previous = saved_run / "checkpoints" / "step-2"
    trainer = resume(demo_data, saved_run)
    calls = []

    def save_model_files(*args, **kwargs):  # the model files are the last and largest write
        calls.append(args[2])
        raise OSError(errno.ENOSPC, "No space left on device", str(args[2] / "model.safetensors"))

    monkeypatch.setattr(trainer_module, "save_model_files", save_model_files)
    with pytest.raises(ckpt.DiskFullError) as info:
        trainer.train()
    assert calls and calls[0].parent.name == ".step-4.partial"  # it really was mid-write
    message = str(info.value)
    assert "No space left on device" in message and "model.safetensors" in message
    assert "needs about" in message and "Whatever was written of it is removed" in message
    assert sorted(p.name for p in (saved_run / "checkpoints").iterdir()) == ["step-2"]
    assert ckpt.latest_checkpoint(saved_run / "checkpoints") == previous
    assert not ckpt.missing_or_truncated(previous, ckpt.read_manifest(previous))


# ----------------------------------------------------------------------------- kill -9


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    return faultlib.reference_losses(demo_data, tmp_path_factory.mktemp("reference"))


@pytest.mark.slow
def test_kill_9_of_one_rank_mid_step(demo_data, tmp_path, reference):
    out = tmp_path / "out"
    r = faultlib.fault_recipe(demo_data, out, max_steps=1000, save_every=3, keep_last=2)
    job = faultlib.Job(faultlib.torchrun_cmd(faultlib.write_recipe(r, tmp_path)), tmp_path)
    job.wait_for(lambda: faultlib.last_logged_step(out) >= 7, "step 7")  # past the checkpoints at 3 and 6
    os.kill(job.ranks()[1], signal.SIGKILL)
    assert job.wait() != 0
    newest = ckpt.latest_checkpoint(out / "checkpoints")
    start = int(newest.name.split("-")[1])
    assert 6 <= start <= faultlib.last_logged_step(out)
    faultlib.resume_and_compare(demo_data, tmp_path / "resume", out, start, reference)


@pytest.mark.slow
def test_kill_9_of_the_whole_job_mid_checkpoint_write(demo_data, tmp_path, reference):
    out = tmp_path / "out"
    root = out / "checkpoints"
    r = faultlib.fault_recipe(demo_data, out, max_steps=1000, save_every=1, keep_last=2)
    job = faultlib.Job(faultlib.torchrun_cmd(faultlib.write_recipe(r, tmp_path)), tmp_path)

    def partial_with_files() -> Path | None:
        found = sorted(root.glob(".step-*.partial"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
        return found[-1] if found and any(found[-1].rglob("*.pt")) else None

    while True:  # freeze the job the moment a save is half-written; if the save won the race, try the next
        job.wait_for(lambda: faultlib.last_logged_step(out) >= 4 and partial_with_files(), "a save in progress",
                     poll=0.002)
        job.signal_all(signal.SIGSTOP)
        partial = partial_with_files()
        if partial is not None:
            break
        job.signal_all(signal.SIGCONT)
    job.kill()
    step = int(partial.name.split("-")[1].split(".")[0])
    assert partial.is_dir() and not (partial / "manifest.json").exists()  # really cut mid-write
    assert ckpt.latest_checkpoint(root) == root / f"step-{step - 1}"
    faultlib.resume_and_compare(demo_data, tmp_path / "resume", out, step - 1, reference)
    assert not partial.exists()  # the resumed run's save pruned the stale temporary
