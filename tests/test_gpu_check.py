"""launch/gpu_check/: the carried wheels cover what the run imports and the GPU machine lacks, the wheel-set
check catches a bad set, and the whole check runs on this CPU in its `--cpu --tiny` mode."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from launch.gpu_check import wheels
from tests.conftest import REPO

# What the check runs on the machine: the library, the tests and benchmark it starts, and itself.
RUN_FILES = [
    *(p for package in ("llava_train", "kernels", "data_tools") for p in (REPO / package).rglob("*.py")),
    *(REPO / "tests" / name for name in ("conftest.py", "test_cuda.py", "test_kernels_triton.py", "test_packing.py")),
    REPO / "tests" / "bench" / "bench_vs_hf.py",
    *(REPO / "launch" / "gpu_check").glob("*.py"),
]
LOCAL = {"llava_train", "kernels", "data_tools", "tests", "launch", "wheels"}
# Imported somewhere in the library but not by anything the check runs; each stays off the machine.
NOT_CARRIED = {
    "wandb": "train/metrics.py imports it only when train.wandb.mode is not `disabled`; the check disables it",
    "datasets": "data_tools/convert_hf.py (the HF datasets converter) only, which the check does not run",
    "flash_attn": "optional: attn_implementation=flash_attention_2 falls back to sdpa without it",
    "liger_kernel": "optional loss backend (stage.loss.backend=liger), never chosen by `auto`",
    "lmms_eval": "llava_train/evaluate/lmms_eval_model.py only, the optional lmms-eval adapter ([eval] extra)",
    "tensorboard": "train/metrics.py imports it only when train.tensorboard is true; the check leaves it off",
    "matplotlib": "llava_train/report.py only (`llava-train report`), which the check does not run",
}


def third_party_imports(files: list[Path]) -> set[str]:
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in LOCAL}


def distributions_of(import_names: set[str]) -> set[str]:
    """Installed distributions (canonical names) providing these import names; a name that nothing
    here provides must be one of NOT_CARRIED's optional ones."""
    provided = metadata.packages_distributions()
    unknown = import_names - set(provided) - set(NOT_CARRIED)
    assert not unknown, f"imports no installed package provides: {unknown}; install them or list them in NOT_CARRIED"
    return {canonicalize_name(dist) for name in import_names - set(NOT_CARRIED) for dist in provided[name]}


def test_wheels_are_exactly_what_the_run_needs_and_the_machine_lacks():
    machine, pinned = wheels.device_packages(), wheels.pins()
    assert not set(pinned) & set(machine), "a carried wheel would shadow the machine's own package"
    needed = {dist for dist in distributions_of(third_party_imports(RUN_FILES)) if dist not in machine}
    # ...and what those need in turn (Requires-Dist of the versions installed here, as on Python 3.12 Linux).
    todo = list(needed)
    while todo:
        for req in wheels.needs(metadata.requires(todo.pop())):
            name = canonicalize_name(req.name)
            if name not in machine and name not in needed:
                needed.add(name)
                todo.append(name)
    missing, extra = needed - set(pinned), set(pinned) - needed
    assert not missing, f"the run needs {sorted(missing)}, which the machine lacks: pin them in wheels.txt"
    assert not extra, f"launch/gpu_check/wheels.txt carries {sorted(extra)}, which nothing the run imports needs"


def fake_wheel(folder: Path, name: str, version: str, requires=(), tag="py3-none-any") -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def test_wheel_dir_check_accepts_the_pinned_set_and_names_each_fault(tmp_path, monkeypatch):
    monkeypatch.setattr(wheels, "pins", lambda: {"alpha": "1.0", "beta-lib": "2.0"})
    monkeypatch.setattr(wheels, "device_packages", lambda: {"torch": "2.11.0", "numpy": None})
    fake_wheel(tmp_path, "alpha", "1.0", ["beta-lib>=2", "numpy", "torch>=2", "sphinx; extra == 'docs'"])
    linux_312 = "cp312-cp312-manylinux_2_17_x86_64"
    fake_wheel(tmp_path, "beta_lib", "2.0", ["colorama; sys_platform == 'win32'"], tag=linux_312)
    assert wheels.check_wheel_dir(tmp_path) == []

    fake_wheel(tmp_path, "alpha", "1.1")  # a second version
    fake_wheel(tmp_path, "gamma", "1.0", ["missing-dep"], tag="cp311-cp311-manylinux_2_17_x86_64")
    fake_wheel(tmp_path, "torch", "2.13.0", tag="cp312-cp312-manylinux_2_28_x86_64")  # would shadow the machine's
    found = "\n".join(wheels.check_wheel_dir(tmp_path))
    assert "two wheels of alpha" in found
    assert "gamma-1.0-cp311-cp311-manylinux_2_17_x86_64.whl does not install on CPython 3.12" in found
    assert "gamma-1.0-cp311-cp311-manylinux_2_17_x86_64.whl is not in wheels.txt" in found
    assert "gamma needs `missing-dep`: neither carried" in found
    assert "shadow the machine's own torch" in found
    (tmp_path / f"beta_lib-2.0-{linux_312}.whl").unlink()
    assert "no wheel for beta-lib==2.0" in "\n".join(wheels.check_wheel_dir(tmp_path))


def test_a_known_machine_version_that_misses_a_requirement_is_reported():
    problems = wheels.unmet({"pkg": wheels.needs(["torch>=2.12"])}, {"torch": "2.11.0"})
    assert problems == ["pkg needs `torch>=2.12` but torch 2.11.0 is what it would get"]


def test_padded_tokenizer_has_the_lm_vocabulary_and_encodes_as_before(tmp_path):
    from data_tools.tokenizer import pad_vocabulary, train_tokenizer
    from llava_train.model.build import load_tokenizer

    texts = ["the image shows a red circle", "describe the picture"]
    train_tokenizer(texts, tmp_path, vocab_size=300)
    before = load_tokenizer(str(tmp_path))
    pad_vocabulary(tmp_path, 2000)
    after = load_tokenizer(str(tmp_path))
    assert len(before) < 2000 == len(after)
    text = "<image>\nthe picture shows a circle"
    assert after(text)["input_ids"] == before(text)["input_ids"]
    with pytest.raises(ValueError, match="more than the 100 asked for"):
        pad_vocabulary(tmp_path, 100)


@pytest.mark.slow
def test_cpu_tiny_mode_runs_every_part_and_reports_the_cuda_skips(tmp_path):
    # Not the process-group variables an in-process Trainer test left in this process (its gloo store still
    # listens on that MASTER_PORT): the check's runs would collide with it (EADDRINUSE).
    launch_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launch_vars}
    env.update(OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", "launch/gpu_check/run.sh", "--cpu", "--tiny"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    tests = report["tests"]
    assert tests["failed"] == 0 and tests["passed"] == 0 and tests["skipped"] >= 5
    assert all("no CUDA" in reason for reason in tests["skip_reasons"].values())
    for side in ("ours", "hf"):
        numbers = report["bench"]["median"][side]
        assert numbers["tokens_per_s"] > 0 and 0 < numbers["mfu_lm_only"] <= numbers["mfu"] < 1
    assert "| MFU " in proc.stdout and "skipped" in proc.stdout
