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


def m3_average(demo_data, tmp_path, scales):
    """A tiny model with an M3 connector in `average` mode and the stage's objective built for it."""
    from llava_train.model.build import build_model, load_tokenizer
    from llava_train.objectives import BuildContext, build_objective

    r = tiny_recipe_dict(demo_data, tmp_path)
    r["model"]["connector"] = {"type": "matryoshka_pool", "options": {"scales": scales, "scale_mode": "average"}}
    recipe = validate_recipe(r)
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer).float().train()
    for p in model.parameters():
        p.requires_grad_(True)
    objective = build_objective(recipe.stage.objective, BuildContext(recipe, tokenizer, model)).train()
    return model, tokenizer, objective


@pytest.mark.parametrize("packed", [False, True])
def test_m3_average_equals_the_mean_of_single_scale_runs(demo_data, tmp_path, packed):
    from llava_train.data.collate import collate_rows
    from llava_train.objectives.budget_average import BudgetAverage
    from tests.test_packing import grads
    from tests.test_visual_budget import compact_examples

    model, tokenizer, objective = m3_average(demo_data, tmp_path, [16, 4, 1])
    assert isinstance(objective, BudgetAverage)
    examples = compact_examples(model, tokenizer)
    rows = [examples[:2], examples[2:]] if packed else [[e] for e in examples]

    def batch(n):
        return collate_rows(rows, tokenizer.pad_token_id, model.image_token_id, tokens_per_image=n, visual_budget=n)

    averaged = objective(model, batch(16))  # the pipeline plans the step at the largest scale
    separate = [objective.inner(model, batch(n)) for n in (16, 4, 1)]  # the plain `lm` objective at each scale
    assert averaged.count == separate[0].count == batch(16).num_supervised_tokens
    mean = sum(out.loss_sum for out in separate) / 3
    torch.testing.assert_close(averaged.loss_sum, mean)
    for n, out in zip((16, 4, 1), separate):
        assert averaged.metrics[f"loss/budget{n}"] == pytest.approx(float(out.loss_sum.detach()) / out.count, rel=1e-5)
    reference, got = grads(model, mean), grads(model, averaged.loss_sum)
    assert reference.keys() == got.keys() and any(n.startswith("connector.") for n in got)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    objective.eval()  # evaluation: one forward at the batch's own scale
    torch.testing.assert_close(objective(model, batch(4)).loss_sum, separate[1].loss_sum)


def test_m3_average_over_one_scale_is_the_plain_loss(demo_data, tmp_path):
    from llava_train.data.collate import collate_rows
    from llava_train.objectives.lm import LMObjective
    from tests.test_visual_budget import compact_examples

    model, tokenizer, objective = m3_average(demo_data, tmp_path, [4])
    examples = compact_examples(model, tokenizer)
    batch = collate_rows([[e] for e in examples], tokenizer.pad_token_id, model.image_token_id,
                         tokens_per_image=4, visual_budget=4)
    assert type(objective.inner) is LMObjective  # the stage's objective, wrapped
    averaged, plain = objective(model, batch), objective.inner(model, batch)
    torch.testing.assert_close(averaged.loss_sum, plain.loss_sum)
    assert averaged.count == plain.count


@pytest.mark.parametrize("connector", ["matryoshka_query", "matryoshka_pool", "matryoshka_pool_average"])
def test_trains_packed_with_a_budget_per_step_and_resumes_exactly(demo_data, tmp_path, connector):
    options = {"num_queries": 16, "heads": 4} if connector == "matryoshka_query" else {}
    average = connector.endswith("_average")
    if average:
        connector, options = "matryoshka_pool", {"scale_mode": "average"}

    def recipe(out, **train):
        r = tiny_recipe_dict(demo_data, out, max_steps=4, lr=1e-3, **train)
        r["model"]["connector"] = {"type": connector, "options": options}
        r["data"].update(eval=[], packing=True, max_tokens_per_row=256)
        return validate_recipe(r)

    assert_resume_matches(recipe, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    budgets = [row["visual_budget"] for row in rows]
    if average:  # every step planned at the full scale, every scale's loss in each
        assert budgets == [16] * 4
        assert all({f"objective/loss/budget{n}" for n in (16, 4, 1)} <= row.keys() for row in rows)
    else:
        assert len(set(budgets)) > 1  # drawn per step


@pytest.fixture(scope="module")
def mqt_checkpoint(demo_data, tmp_path_factory):
    recipe = tiny_recipe_dict(demo_data, tmp_path_factory.mktemp("mqt"), max_steps=1)
    recipe["model"]["connector"] = {"type": "matryoshka_query", "options": {"num_queries": 16, "heads": 4}}
    recipe["data"]["eval"] = []
    return Trainer(validate_recipe(recipe)).train().checkpoint


def test_generate_at_any_budget_and_refuses_an_invalid_one(mqt_checkpoint, tmp_path):
    from PIL import Image

    from llava_train.cli import main

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    base = ["generate", str(mqt_checkpoint), "--image", str(image), "--prompt", "What colour?", "--max-new-tokens", "3"]
    for m in ("1", "4", "16"):
        assert main(base + ["--visual-tokens", m]) == 0
    with pytest.raises(ValueError, match="visual budget 5 is not one this connector offers"):
        main(base + ["--visual-tokens", "5"])


def test_eval_at_a_budget_and_a_budget_sweep(mqt_checkpoint, demo_data, tmp_path, capsys, monkeypatch):
    from llava_train.cli import main
    from llava_train.modules.matryoshka import MatryoshkaQueryConnector

    emitted = []  # visual tokens per image of every connector call: the budget reaches the model
    forward = MatryoshkaQueryConnector.forward
    monkeypatch.setattr(MatryoshkaQueryConnector, "forward",
                        lambda self, *a, **k: emitted.append(forward(self, *a, **k).shape[1]) or forward(self, *a, **k))
    base = ["eval", str(mqt_checkpoint), "--data", str(demo_data / "eval" / "shard-*.tar"), "--limit", "8",
            "--max-new-tokens", "2", "--by", "qtype"]
    assert main(base + ["--visual-tokens", "4", "--out", str(tmp_path / "one")]) == 0
    assert set(emitted) == {4}
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert single["visual_budget"] == 4 and single["visual_tokens"] == 4 and single["num"] == 8
    capsys.readouterr()
    emitted.clear()
    assert main(base + ["--visual-tokens", "1,4,16", "--out", str(tmp_path / "sweep")]) == 0
    assert set(emitted) == {1, 4, 16}
    table = capsys.readouterr().out.splitlines()
    qtypes = sorted(single["by"]["qtype"])
    assert table[0].split() == ["budget", "tokens", "all", *[f"qtype={q}" for q in qtypes]]
    assert [line.split()[:2] for line in table[1:4]] == [["1", "1"], ["4", "4"], ["16", "16"]]
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [s["visual_budget"] for s in sweep] == [1, 4, 16]
    at4 = json.loads((tmp_path / "sweep" / "budget4" / "summary.json").read_text())
    assert at4["accuracy"] == single["accuracy"] and at4["by"] == single["by"]  # the same answers as alone
    assert f"{at4['accuracy']:.1%}" == table[2].split()[2]
    assert main(base + ["--visual-tokens", "5", "--out", str(tmp_path / "bad")]) == 2
    assert "visual budget 5 is not one this connector offers (valid budgets: [1, 2, 4, 8, 16]" in capsys.readouterr().err
    assert main(base + ["--visual-tokens", "all", "--out", str(tmp_path / "all")]) == 0
    assert [s["visual_budget"] for s in json.loads((tmp_path / "all" / "sweep.json").read_text())] == [1, 2, 4, 8, 16]


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
