"""A CPU run compiles no DeepSpeed op: the first `llava-train demo` on a fresh machine starts at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_recipe_dict

pytestmark = pytest.mark.slow


def test_cpu_training_builds_no_deepspeed_op(demo_data, tmp_path):
    """DeepSpeed's CPU backend compiles its shared-memory collectives op (into TORCH_EXTENSIONS_DIR) when
    its process group starts; we never use that op. A fresh extensions folder must stay empty, and with
    CXX=false any compile attempt fails at once rather than taking minutes."""
    recipe = tiny_recipe_dict(demo_data, tmp_path / "out", max_steps=1)
    recipe["data"]["eval"] = []
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "CXX": "false", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # a plain one-process run
        env.pop(key, None)
    cmd = [sys.executable, "-m", "llava_train", "train", str(tmp_path / "recipe.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(p.name for p in extensions.iterdir())
