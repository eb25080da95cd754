"""The objective seam: normalisers, a frozen second model (checkpoint or exported Llava folder, or the
policy with adapters disabled) that never trains, never saves, and is partitioned under ZeRO-3."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from llava_train.model.export import export_checkpoint
from llava_train.objectives import OBJECTIVES
from llava_train.recipe import validate_recipe
from llava_train.train.trainer import Trainer
from tests import fixture_modules  # noqa: F401  (registers test_anchor)
from tests.conftest import tiny_recipe_dict


def anchor_recipe(demo_data, out, reference=None, stage="sft", init_from=None, **train):
    recipe = tiny_recipe_dict(demo_data, out, **{"max_steps": 2, "lr": 1e-2, **train})
    recipe["plugins"] = ["tests.fixture_modules"]
    recipe["stage"] = {"name": stage, "objective": {"type": "test_anchor", "reference": reference},
                       "init_from": init_from, "lora": {"r": 2, "alpha": 4, "dropout": 0.0}}
    recipe["data"]["eval"] = []
    return validate_recipe(recipe)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def sft_checkpoint(demo_data, tmp_path_factory):
    recipe = validate_recipe(tiny_recipe_dict(demo_data, tmp_path_factory.mktemp("sft"), max_steps=1))
    return Trainer(recipe).train().checkpoint


def test_normaliser_counts():
    batch = SimpleNamespace(num_supervised_tokens=17, num_samples=4, num_groups=2)
    for normaliser, expected in (("tokens", 17), ("sequences", 4), ("pairs", 2)):
        cls = type("Counted", (OBJECTIVES["lm"],), {"normaliser": normaliser})
        assert cls.count(cls.__new__(cls), batch) == expected


@pytest.mark.parametrize("exported", [False, True], ids=["checkpoint", "exported-llava"])
def test_frozen_reference_never_trains_or_saves(demo_data, tmp_path, sft_checkpoint, exported):
    reference = sft_checkpoint
    if exported:
        reference = export_checkpoint(sft_checkpoint, tmp_path / "hf")
    trainer = Trainer(anchor_recipe(demo_data, tmp_path / "run", str(reference), init_from=str(sft_checkpoint)))
    ref = trainer.objective.frozen["reference"]
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(not p.requires_grad and id(p) not in in_optimizer for p in ref.parameters())
    result = trainer.train()
    trainer.engine.train()  # what evaluation does when it hands back to training
    assert not ref.training  # ...and the reference stays in eval mode (no dropout)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, before[key]), key
    saved = load_file(str(result.checkpoint / "model" / "model.safetensors"))
    assert saved.keys() == {k for k in trainer.model.state_dict()}  # the student only
    first = rows(tmp_path / "run")[0]
    assert first["objective/anchor_sum"] == pytest.approx(0.0, abs=1e-6)  # same weights: nothing to pull
    assert rows(tmp_path / "run")[1]["objective/anchor_sum"] > 0


def test_adapters_disabled_reference_costs_no_copy(demo_data, tmp_path):
    trainer = Trainer(anchor_recipe(demo_data, tmp_path / "run", None, stage="sft_lora", max_steps=3))
    assert len(trainer.objective.frozen) == 0
    trainer.train()
    steps = rows(tmp_path / "run")
    assert steps[0]["objective/anchor_sum"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: policy = base
    assert steps[-1]["objective/anchor_sum"] > 0  # the adapters moved; the disabled pass stayed the base


@pytest.mark.slow
def test_two_ranks_zero3_with_a_reference_match_one(demo_data, tmp_path, sft_checkpoint):
    from tests.test_distributed import launch

    def recipe(out, micro, zero):
        r = anchor_recipe(demo_data, out / "out", str(sft_checkpoint), init_from=str(sft_checkpoint),
                          max_steps=3, micro_batch_size=micro, zero_stage=zero)
        return r.model_dump(mode="json")

    single = launch(recipe(tmp_path / "one", 8, 0), tmp_path / "one", nproc=1)
    two = launch(recipe(tmp_path / "two", 4, 3), tmp_path / "two", nproc=2)
    for step, loss in single.items():
        assert two[step] == pytest.approx(loss, rel=1e-4), step
    fraction = rows(tmp_path / "two" / "out")[0]["objective/reference_local_fraction"]
    assert fraction < 0.6  # each rank holds about half of the reference: ZeRO-3 partitioned it
