"""`llava-train env` / `doctor`: facts about this machine, and the known-bad combinations it warns
about (each rule checked on made-up facts, so GPU-only rules are tested on a CPU too)."""

from __future__ import annotations

import copy
import json
import os
import platform
from importlib import metadata

import pytest

from llava_train import env_report
from llava_train.cli import main
from llava_train.recipe import validate_recipe
from tests.conftest import tiny_recipe_dict

HEALTHY = {
    "python": "3.11.7",
    "platform": "Linux",
    "versions": {"torch": "2.13.0", "deepspeed": "0.19.8", "transformers": "5.23.0", "peft": "0.21.2",
                 "webdataset": "1.0.2", "torchdata": "0.11.0", "triton": "3.9.0", "flash-attn": "2.8.3",
                 "llava_train": "0.1.0"},
    "torch_cuda": "12.8",
    "gpus": [{"name": "NVIDIA H100", "capability": "9.0", "memory_gib": 79.6, "bf16": True}],
    "gpu_hardware": True,
    "cpu": {"model": "Xeon", "cores": 64, "usable_cores": 64, "flags": ["avx2", "avx512f"]},
    "deepspeed_ops": {"cpu_adam": {"prebuilt": False, "buildable": True}},
    "env": {"WORLD_SIZE": "8", "MASTER_ADDR": "node-a"},
    "world_size": 8,
    "torchrun_forwards_signals": True,
}


def facts(**changes) -> dict:
    out = copy.deepcopy(HEALTHY)
    for dotted, value in changes.items():
        node, *path, last = [out, *dotted.split("__")]
        for key in path:
            node = node[key]
        node[last] = value
    return out


def recipe(tmp_path, precision="bf16", attn="flash_attention_2"):
    r = tiny_recipe_dict(tmp_path, tmp_path / "out", precision=precision)
    r["model"]["attn_implementation"] = attn
    return validate_recipe(r)


def test_a_healthy_setup_has_no_problems(tmp_path):
    assert env_report.problems(HEALTHY) == []
    assert env_report.problems(HEALTHY, recipe(tmp_path)) == []


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"versions__deepspeed": "0.14.4"}, "deepspeed 0.14.4 is older than 0.16"),
        ({"gpus": []}, "is a CUDA 12.8 build but sees no GPU"),
        ({"torch_cuda": None}, "an NVIDIA GPU is present but torch 2.13.0 is a CPU-only build"),
        ({"torchrun_forwards_signals": False}, "--signal=TERM@120"),
        ({"env": {"WORLD_SIZE": "8"}}, "MASTER_ADDR is not set"),
    ],
)
def test_machine_problems(changes, expected):
    found = env_report.problems(facts(**changes))
    assert len(found) == 1 and expected in found[0], found


def test_flash_attention_without_flash_attn_or_without_a_gpu(tmp_path):
    no_package = env_report.problems(facts(**{"versions__flash-attn": None}), recipe(tmp_path))
    assert no_package == [
        "model.attn_implementation=flash_attention_2 but flash-attn is not installed: pip install flash-attn "
        "(CUDA only), or set model.attn_implementation=sdpa"
    ]
    cpu_only = facts(gpus=[], torch_cuda=None, gpu_hardware=False)
    assert any("needs a CUDA GPU" in p for p in env_report.problems(cpu_only, recipe(tmp_path)))
    assert env_report.problems(cpu_only, recipe(tmp_path, attn="sdpa", precision="fp32")) == []


def test_bf16_on_a_gpu_without_bf16(tmp_path):
    v100 = {"name": "Tesla V100", "capability": "7.0", "memory_gib": 32.0, "bf16": False}
    found = env_report.problems(facts(gpus=[HEALTHY["gpus"][0], v100]), recipe(tmp_path))
    assert found == ["train.precision=bf16 but GPU 1 (Tesla V100, compute capability 7.0) has no bf16 support "
                     "(it needs 8.0 or newer); set train.precision=fp32"]
    assert env_report.problems(facts(gpus=[v100]), recipe(tmp_path, precision="fp32")) == []


def test_bf16_on_a_cpu_without_bf16_instructions(tmp_path):
    cpu_only = facts(gpus=[], torch_cuda=None, gpu_hardware=False)
    found = env_report.problems(cpu_only, recipe(tmp_path, attn="sdpa"))
    assert len(found) == 1 and "without AVX512-BF16 or AMX" in found[0]
    cpu_only["cpu"]["flags"].append("amx_bf16")
    assert env_report.problems(cpu_only, recipe(tmp_path, attn="sdpa")) == []


def test_collect_describes_this_machine(monkeypatch):
    import torch

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    found = env_report.collect()
    assert found["python"] == platform.python_version()
    assert found["versions"]["torch"] == metadata.version("torch")
    assert found["versions"]["deepspeed"] == metadata.version("deepspeed")
    assert found["torch_cuda"] == torch.version.cuda
    assert len(found["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert found["cpu"]["cores"] == os.cpu_count()
    assert set(found["cpu"]["flags"]) <= set(env_report.CPU_FLAGS)
    assert set(found["deepspeed_ops"]) == set(env_report.DS_OPS)
    assert (found["world_size"], found["env"]["MASTER_ADDR"]) == (4, "127.0.0.1")


def test_cli_prints_the_report_and_exits_nonzero_on_problems(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["env"])
    text = capsys.readouterr().out
    assert f"torch         {metadata.version('torch')}" in text
    assert "world size    1" in text and "deepspeed ops" in text
    assert code == (1 if "WARNING:" in text else 0)

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps(tiny_recipe_dict(tmp_path, tmp_path / "out")))
    code = main(["doctor", str(recipe_file), "model.attn_implementation=flash_attention_2", "--json"])
    report = json.loads(capsys.readouterr().out)
    flash = [w for w in report["warnings"] if "flash_attention_2" in w]
    assert bool(flash) == (report["versions"]["flash-attn"] is None or not report["gpus"])
    assert code == (1 if report["warnings"] else 0)
