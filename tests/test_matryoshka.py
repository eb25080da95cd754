"""Matryoshka connectors (llava_train/modules/matryoshka.py): nesting, budgets and pooling invariants."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llava_train.model.connectors import build_connector
from llava_train.modules.matryoshka import pool_grid, valid_scales
from llava_train.recipe import RecipeError, validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.test_train import assert_resume_matches

GRID = 4  # TINY_VISION: 32 px images, 8 px patches


def query(**options):
    torch.manual_seed(0)
    return build_connector("matryoshka_query", vision_hidden=32, lm_hidden=64, num_features=GRID * GRID,
                           num_queries=16, heads=4, **options)


@pytest.mark.parametrize("keys", ["positions", "features"])
def test_query_outputs_nest_and_full_budget_is_the_whole_connector(keys):
    connector = query(keys=keys).eval()
    features = torch.randn(3, GRID * GRID, 32)
    with torch.no_grad():
        full = connector(features)
        assert full.shape == (3, 16, 64)
        torch.testing.assert_close(connector(features, 16), full)
        for m in (1, 2, 4, 8):
            torch.testing.assert_close(connector(features, m), full[:, :m])  # Q(M)[:, :m] == Q(m)
        torch.testing.assert_close(connector(features, 8)[:, :2], connector(features, 2))


def test_only_the_first_m_queries_get_gradient():
    connector = query()
    connector(torch.randn(2, GRID * GRID, 32), 4).square().sum().backward()
    grad = connector.queries.grad
    assert grad[:4].abs().sum(dim=1).gt(0).all() and grad[4:].abs().sum() == 0


def test_invalid_budgets_and_scales_are_refused_with_the_valid_ones(demo_data, tmp_path):
    with pytest.raises(ValueError, match=r"visual budget 3 is not one this connector offers \(valid budgets: \[1, 2, 4, 8, 16\]"):
        query()(torch.randn(1, GRID * GRID, 32), 3)
    with pytest.raises(ValueError, match=r"scales \[9\] do not tile the 4x4 patch grid; valid: \[16, 4, 1\]"):
        build_connector("matryoshka_pool", vision_hidden=32, lm_hidden=64, num_features=16, scales=[9])
    recipe = tiny_recipe_dict(demo_data, tmp_path)
    recipe["model"]["connector"] = {"type": "matryoshka_pool", "options": {"scales": [16, 9]}}
    with pytest.raises(RecipeError, match=r"model.connector.options.*scales \[9\] do not tile the 4x4 patch grid"):
        validate_recipe(recipe)  # at recipe load, before any model is built
    recipe["model"]["connector"] = {"type": "matryoshka_query", "options": {"num_queries": 8, "budgets": [4, 16]}}
    with pytest.raises(RecipeError, match=r"budgets \[4, 16\] must lie in 1..num_queries=8"):
        validate_recipe(recipe)


def test_pooling_identities():
    tokens = torch.randn(2, 64, 5)  # an 8x8 grid
    torch.testing.assert_close(pool_grid(tokens, 8), tokens)  # the full scale is the identity
    torch.testing.assert_close(pool_grid(tokens, 2), pool_grid(pool_grid(tokens, 4), 2))  # pool-4 = pool-2 twice
    constant = torch.full((1, 64, 3), 0.7)
    torch.testing.assert_close(pool_grid(constant, 1), torch.full((1, 1, 3), 0.7))
    assert valid_scales(24) == [576, 144, 64, 36, 16, 9, 4, 1]


def test_pool_connector_at_full_scale_equals_mlp():
    torch.manual_seed(0)
    mlp = build_connector("mlp", vision_hidden=32, lm_hidden=64, num_features=16)
    pool = build_connector("matryoshka_pool", vision_hidden=32, lm_hidden=64, num_features=16)
    pool.load_state_dict(mlp.state_dict())
    features = torch.randn(2, 16, 32)
    torch.testing.assert_close(pool(features), mlp(features))
    torch.testing.assert_close(pool(features, 16), mlp(features))
    torch.testing.assert_close(pool(features, 1), mlp(features).mean(dim=1, keepdim=True))


@pytest.mark.parametrize("connector", ["matryoshka_query", "matryoshka_pool"])
def test_trains_packed_with_a_budget_per_step_and_resumes_exactly(demo_data, tmp_path, connector):
    options = {"num_queries": 16, "heads": 4} if connector == "matryoshka_query" else {}

    def recipe(out, **train):
        r = tiny_recipe_dict(demo_data, out, max_steps=4, lr=1e-3, **train)
        r["model"]["connector"] = {"type": connector, "options": options}
        r["data"].update(eval=[], packing=True, max_tokens_per_row=256)
        return validate_recipe(r)

    assert_resume_matches(recipe, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    budgets = [row["visual_budget"] for row in rows]
    assert len(set(budgets)) > 1  # drawn per step


def test_generate_at_any_budget_and_refuses_an_invalid_one(demo_data, tmp_path, capsys):
    from PIL import Image

    from llava_train.cli import main

    recipe = tiny_recipe_dict(demo_data, tmp_path / "run", max_steps=1)
    recipe["model"]["connector"] = {"type": "matryoshka_query", "options": {"num_queries": 16, "heads": 4}}
    recipe["data"]["eval"] = []
    checkpoint = Trainer(validate_recipe(recipe)).train().checkpoint
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    base = ["generate", str(checkpoint), "--image", str(image), "--prompt", "What colour?", "--max-new-tokens", "3"]
    for m in ("1", "4", "16"):
        assert main(base + ["--visual-tokens", m]) == 0
    with pytest.raises(ValueError, match="visual budget 5 is not one this connector offers"):
        main(base + ["--visual-tokens", "5"])


@pytest.mark.slow
def test_two_rank_zero3_steps_with_a_different_budget_per_rank(demo_data, tmp_path):
    from tests.test_distributed import launch

    recipe = tiny_recipe_dict(demo_data, tmp_path / "out", max_steps=3, micro_batch_size=2, zero_stage=3)
    options = {"num_queries": 16, "heads": 4, "per_rank": True}
    recipe["model"]["connector"] = {"type": "matryoshka_query", "options": options}
    recipe["data"]["eval"] = []
    spec = query(**{k: v for k, v in options.items() if k not in ("num_queries", "heads")}).visual_tokens()
    drawn = [(spec.budget_for(0, step, 0), spec.budget_for(0, step, 1)) for step in range(3)]
    assert any(a != b for a, b in drawn)  # the ranks do see different counts in some step
    losses_by_step = launch(recipe, tmp_path, nproc=2)
    assert sorted(losses_by_step) == [1, 2, 3]
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses_by_step.values())  # NaN is null in JSONL
