"""Checkpoint folders: atomic commit, crash safety, pruning, resume resolution, RNG round trip."""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import llava_train
from llava_train.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent


def save(root: Path, step: int, payload: str = "weights") -> Path:
    tmp = ckpt.begin_save(root, step)
    (tmp / "model").mkdir()
    (tmp / "model" / "weights.bin").write_text(payload)
    return ckpt.commit_save(tmp, ckpt.build_manifest(step, step * 100, step * 4, {"train": {"lr": 1e-3}}))


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ----------------------------------------------------------------------------- saving


def test_commit_is_atomic_and_leaves_only_the_final_folder(tmp_path):
    tmp = ckpt.begin_save(tmp_path, 5)
    assert tmp.name == ".step-5.partial" and tmp.is_dir()
    (tmp / "state.pt").write_bytes(b"x")
    assert ckpt.latest_checkpoint(tmp_path) is None  # not visible until committed
    final = ckpt.commit_save(tmp, ckpt.build_manifest(5, 1000, 20, {"a": 1}))
    assert final == tmp_path / "step-5"
    assert names(tmp_path) == ["step-5"]
    assert (final / "state.pt").read_bytes() == b"x"
    assert ckpt.latest_checkpoint(tmp_path) == final


def test_manifest_contents(tmp_path):
    manifest = ckpt.read_manifest(save(tmp_path, 3))
    assert manifest["complete"] is True
    assert (manifest["step"], manifest["tokens_seen"], manifest["samples_seen"]) == (3, 300, 12)
    assert manifest["recipe"] == {"train": {"lr": 1e-3}}
    assert set(manifest["versions"]) == {"torch", "deepspeed", "transformers", "peft", "llava_train", "python"}
    assert manifest["versions"]["python"] == platform.python_version()
    assert manifest["versions"]["llava_train"] == llava_train.__version__
    assert manifest["timestamp"].endswith("+00:00")


def test_begin_save_clears_a_stale_partial(tmp_path):
    stale = ckpt.begin_save(tmp_path, 2)
    (stale / "junk").write_text("left by a crash")
    fresh = ckpt.begin_save(tmp_path, 2)
    assert fresh == stale and list(fresh.iterdir()) == []


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save(tmp_path, 4, payload="first")
    final = save(tmp_path, 4, payload="second")
    assert names(tmp_path) == ["step-4"]
    assert (final / "model" / "weights.bin").read_text() == "second"


def test_commit_refuses_a_folder_not_made_by_begin_save(tmp_path):
    with pytest.raises(ValueError, match="expected `.step-N.partial`"):
        ckpt.commit_save(tmp_path, {"step": 1})
    tmp = ckpt.begin_save(tmp_path, 1)
    with pytest.raises(ValueError, match="manifest says step 2"):
        ckpt.commit_save(tmp, {"step": 2})


# ----------------------------------------------------------------------------- crashes


def test_crash_before_commit_is_ignored(tmp_path):
    good = save(tmp_path, 1)
    partial = ckpt.begin_save(tmp_path, 2)
    (partial / "half_written.pt").write_bytes(b"\0" * 10)
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_step_folder_without_manifest_is_ignored(tmp_path):
    good = save(tmp_path, 1)
    (tmp_path / "step-2").mkdir()  # e.g. copied by hand, or written by another tool
    (tmp_path / "step-3").mkdir()
    (tmp_path / "step-3" / "manifest.json").write_text("{not json")
    (tmp_path / "step-4").mkdir()
    (tmp_path / "step-4" / "manifest.json").write_text(json.dumps({"step": 4, "complete": False}))
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_latest_orders_by_step_number_not_by_name(tmp_path):
    for step in (9, 10, 2):
        save(tmp_path, step)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-10"


def test_latest_of_a_missing_folder_is_none(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "nothing-here") is None


CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    from llava_train.train.checkpoint import begin_save

    tmp = begin_save(sys.argv[1], 2)
    chunk = b"\\0" * (1 << 20)
    with open(tmp / "optimizer_states.pt", "wb") as handle:
        for i in range(2000):  # up to 2 GiB: far more than gets written before the kill
            handle.write(chunk)
            handle.flush()
            if i == 3:
                print("writing", flush=True)
    """
)


def test_kill_9_while_writing_leaves_the_previous_checkpoint_as_latest(tmp_path):
    previous = save(tmp_path, 1)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    partial = tmp_path / ".step-2.partial"
    assert (partial / "optimizer_states.pt").stat().st_size >= 4 << 20  # really was mid-write
    assert ckpt.latest_checkpoint(tmp_path) == previous
    # The next save at that step starts clean and commits normally.
    assert save(tmp_path, 2) == tmp_path / "step-2"
    assert (tmp_path / "step-2" / "model" / "weights.bin").read_text() == "weights"
    assert names(tmp_path) == ["step-1", "step-2"]


# ----------------------------------------------------------------------------- pruning


def test_prune_keeps_the_newest_and_removes_stale_temporaries(tmp_path):
    for step in (1, 2, 3, 10):
        save(tmp_path, step)
    ckpt.begin_save(tmp_path, 11)  # a crashed save
    (tmp_path / ".step-7.deleting").mkdir()  # a crashed prune
    (tmp_path / "step-5").mkdir()  # not ours to judge: no manifest
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert names(tmp_path) == ["step-10", "step-3", "step-5"]
    assert {p.name for p in deleted} == {"step-1", "step-2", ".step-11.partial", ".step-7.deleting"}


def test_prune_with_fewer_checkpoints_than_keep_last(tmp_path):
    save(tmp_path, 1)
    assert ckpt.prune_checkpoints(tmp_path, keep_last=3) == []
    assert names(tmp_path) == ["step-1"]


def test_prune_refuses_keep_last_zero(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        ckpt.prune_checkpoints(tmp_path, keep_last=0)


# ----------------------------------------------------------------------------- resume


def test_resolve_resume_variants(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.resolve_resume(tmp_path, None) is None
    assert ckpt.resolve_resume(tmp_path, "auto") is None  # nothing saved yet: start fresh
    first, second = save(root, 1), save(root, 2)
    ckpt.begin_save(root, 3)  # partial: never chosen
    assert ckpt.resolve_resume(tmp_path, "auto") == second
    assert ckpt.resolve_resume(tmp_path, str(first)) == first


def test_resolve_resume_rejects_an_incomplete_path(tmp_path):
    partial = ckpt.begin_save(tmp_path / "checkpoints", 3)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.resolve_resume(tmp_path, str(partial))
    message = str(info.value)
    assert f"not a complete llava_train checkpoint: {partial}" in message
    assert "no manifest.json" in message and "`auto`" in message


@pytest.mark.parametrize(
    "content, reason",
    [(None, "no such folder"), ("", "unreadable"), ("[1]", '"complete": true'), ('{"complete": false}', "complete")],
)
def test_read_manifest_says_why(tmp_path, content, reason):
    folder = tmp_path / "step-1"
    if content is not None:
        folder.mkdir()
        (folder / "manifest.json").write_text(content)
    with pytest.raises(ckpt.CheckpointError, match="not a complete llava_train checkpoint") as info:
        ckpt.read_manifest(folder)
    assert reason in str(info.value)


# ----------------------------------------------------------------------------- RNG


def draw() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_round_trip_through_torch_save(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    draw()
    torch.save({"rng": ckpt.capture_rng_state()}, tmp_path / "state.pt")
    expected = draw()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ckpt.restore_rng_state(torch.load(tmp_path / "state.pt", weights_only=False)["rng"])
    assert draw() == expected
