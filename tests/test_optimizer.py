"""The optimizer the recipe builds: torch's AdamW with its fused kernel where the device allows,
the same update rule as the plain per-parameter loop, and stepped by DeepSpeed under ZeRO and offload."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llava_train.recipe import validate_recipe
from llava_train.train.engine import build_optimizer
from tests.conftest import tiny_recipe_dict


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))


def _groups(model: nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": 0.1, "lr": 1e-2, "name": "w"},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": 3e-3, "name": "w.no_decay"},
    ]


def _train(optimizer_of, steps: int = 5):
    model = _model()
    optimizer, schedule = optimizer_of(_groups(model))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        schedule.step()
    return model, optimizer


@pytest.fixture
def recipe(demo_data, tmp_path):
    return validate_recipe(tiny_recipe_dict(demo_data, tmp_path, warmup_ratio=0.2, max_steps=10))


def test_cpu_float_parameters_get_the_fused_kernel(recipe):
    optimizer, _ = build_optimizer(_groups(_model()), recipe)
    assert optimizer.defaults["fused"] is True


def test_fused_states_equal_the_plain_loops_after_five_steps(recipe):
    fused_model, fused = _train(lambda groups: build_optimizer(groups, recipe))

    def plain(groups):  # torch's per-parameter loop, under the recipe's own schedule
        optimizer = torch.optim.AdamW(groups, lr=recipe.train.lr, betas=recipe.train.betas, foreach=False)
        _, schedule = build_optimizer(_groups(_model()), recipe)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_lambdas[0])

    plain_model, optimizer = _train(plain)
    assert not optimizer.defaults["fused"]
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[a][key], optimizer.state[b][key], msg=f"{name} {key}")
    assert [g["lr"] for g in fused.param_groups] == pytest.approx([g["lr"] for g in optimizer.param_groups])
    assert not torch.equal(fused_model[0].weight, _model()[0].weight)  # it did move


def test_parameters_the_fused_kernel_refuses_get_foreach(recipe):
    groups = [{"params": [nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))], "name": "meta"}]
    optimizer, _ = build_optimizer(groups, recipe)
    assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"] is True


@pytest.mark.parametrize("zero, offload", [(0, False), (2, False), (2, True), (3, True)])
def test_deepspeed_steps_the_fused_optimizer(demo_data, tmp_path, zero, offload):
    """Under each ZeRO stage and CPU offload, DeepSpeed steps the fused AdamW (not a CPUAdam of its own)
    and the run's losses stay finite."""
    from llava_train.train.trainer import Trainer

    recipe = validate_recipe(tiny_recipe_dict(demo_data, tmp_path, max_steps=3, zero_stage=zero, offload=offload,
                                              log_every=1))
    trainer = Trainer(recipe)
    trainer.train(save_final=False)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.optimizer.defaults["fused"] is True
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
