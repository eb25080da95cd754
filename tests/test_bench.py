"""`llava-train bench`: the step-time split covers disjoint phases of each step."""

from __future__ import annotations

import yaml

from llava_train.bench import PHASES, run_bench
from tests.conftest import tiny_recipe_dict


def test_bench_reports_a_consistent_split(demo_data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(demo_data, tmp_path / "unused")))
    report = run_bench(str(recipe), ["stage.trainable.vision=true"], steps=3, warmup=1)
    assert report["steps"] == 3
    assert set(report["split_s"]) == set(PHASES)
    assert all(seconds > 0 for seconds in report["split_s"].values())
    # Phases are disjoint spans inside the step, so together they cannot exceed it.
    assert sum(report["split_s"].values()) <= report["step_time_s"] * 1.5  # medians of parts vs median of sums
    assert 0 <= report["padding_fraction"] < 1
    assert report["supervised_tokens_per_s"] < report["tokens_per_s"]
    assert 0 < report["mfu_lm_only"] < report["mfu"]  # the trainable tower's FLOPs count only in `mfu`
    assert not (tmp_path / "unused").exists()  # bench writes no checkpoint into the recipe's output dir
