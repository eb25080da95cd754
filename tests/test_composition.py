"""Composition: every allowed pair of registered modules and objectives trains together under
two-process ZeRO-3; refused pairs are refused at recipe load; the support matrix is current.

The test-only modules of tests/fixture_modules.py take part, so the seam is exercised before any
technique ships; each technique adds itself simply by registering (with `example_options`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llava_train.composition import allowed_pairs, support_matrix
from llava_train.modules import MODULES
from llava_train.objectives import OBJECTIVES
from llava_train.recipe import RecipeError, validate_recipe
from tests import fixture_modules  # noqa: F401  (registers the test modules)
from tests.conftest import REPO, tiny_recipe_dict
from tests.test_groups import pair_shards  # noqa: F401  (a fixture: preference pairs for objectives that read them)

STEPS = 2


def pair_recipe(demo_data: Path, workdir: Path, a: type, b: type, pairs: list[str], zero: int = 3) -> dict:
    recipe = tiny_recipe_dict(demo_data, workdir / "out", max_steps=STEPS, micro_batch_size=2, zero_stage=zero)
    recipe["plugins"] = ["tests.fixture_modules"]
    recipe["data"]["eval"] = []
    if any(getattr(cls, "accepts_groups", False) for cls in (a, b)):  # an objective that reads preference pairs
        recipe["data"]["train"] = [str(p) for p in pairs]
        recipe["stage"]["lora"] = {"r": 2, "alpha": 4, "dropout": 0.0}
    for cls in (a, b):
        spec = {"type": cls.name, **cls.example_options(workdir)}
        if cls.name in OBJECTIVES and cls is OBJECTIVES[cls.name]:
            recipe["stage"]["objective"] = spec
        else:
            recipe.setdefault("modules", []).append(spec)
    return recipe


def test_support_matrix_is_current():
    doc = (REPO / "docs" / "support-matrix.md").read_text()
    assert doc == support_matrix(), "regenerate: python -m llava_train.composition > docs/support-matrix.md"


def test_refused_pairs_are_refused_with_a_message(demo_data, tmp_path, pair_shards):
    _, refused = allowed_pairs(list(MODULES.values()), list(OBJECTIVES.values()))
    assert refused  # the fixtures declare one
    for a, b in refused:
        with pytest.raises(RecipeError, match="do not combine"):
            validate_recipe(pair_recipe(demo_data, tmp_path / f"{a.name}-{b.name}", a, b, pair_shards))


@pytest.mark.slow
def test_every_allowed_pair_trains_under_two_process_zero3(demo_data, tmp_path, pair_shards):
    modules = [cls for name, cls in MODULES.items() if name != "test_gate_refuse"]  # that one is for refusals
    allowed, _ = allowed_pairs(modules, list(OBJECTIVES.values()))
    files = []
    for a, b in allowed:
        name = f"{a.name}--{b.name}"
        recipe = pair_recipe(demo_data, tmp_path / name, a, b, pair_shards)
        validate_recipe(recipe)  # allowed pairs pass every recipe rule
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        files.append(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "tests" / "pair_runner.py"), str(tmp_path), *map(str, files)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for path in files:
        for rank in (0, 1):
            result = json.loads((tmp_path / f"{path.stem}.rank{rank}.json").read_text())
            assert result["step"] == STEPS and result["finite"], (path.stem, rank, result)
