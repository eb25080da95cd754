"""The module seam, proven with the test-only `test_gate` module (tests/fixture_modules.py).

Attach after weights load and before the stage freezes parts; every trainable parameter in
exactly one optimizer group; token roles and per-step draws from the forward context; aux losses
once per forward with and without gradient checkpointing; checkpoints that rebuild the module;
export as declared; bad recipes refused before any model is built.
"""

from __future__ import annotations

import json

import pytest
import torch

from llava_train.model.build import apply_stage, build_model, load_tokenizer
from llava_train.model.context import ForwardContext, RunState
from llava_train.model.export import export_checkpoint
from llava_train.model.io import initialise_from, load_model_files
from llava_train.modules.attach import attach_modules, release_module_parameters
from llava_train.recipe import RecipeError, validate_recipe
from llava_train.train.engine import param_groups
from llava_train.train.trainer import Trainer
from tests import fixture_modules
from tests.conftest import tiny_recipe_dict
from tests.test_model import make_batch
from tests.test_train import assert_resume_matches

PLUGIN = "tests.fixture_modules"


def gate_recipe(demo_data, out, gate: dict | None = None, stage: str = "sft", **train) -> dict:
    recipe = tiny_recipe_dict(demo_data, out, **train)
    recipe["plugins"] = [PLUGIN]
    recipe["modules"] = [{"type": "test_gate", "layers": [0, 1], **(gate or {})}]
    recipe["stage"] = {"name": stage, "lora": {"r": 2, "alpha": 4, "dropout": 0.0}}
    recipe["data"]["eval"] = []
    return recipe


def built(recipe_dict):
    recipe = validate_recipe(recipe_dict)
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer)
    attach_modules(model, recipe.modules)
    return recipe, model, tokenizer


# ----------------------------------------------------------------------------- recipe checks


def test_unknown_module_type_and_option_are_named(demo_data, tmp_path):
    recipe = gate_recipe(demo_data, tmp_path)
    recipe["modules"][0]["type"] = "test_gat"
    with pytest.raises(RecipeError, match=r"modules\[0\]\.type`: unknown module type `test_gat`.*test_gate"):
        validate_recipe(recipe)
    recipe = gate_recipe(demo_data, tmp_path, {"layrs": [0]})
    with pytest.raises(RecipeError, match=r"unknown key `modules\[0\]\.layrs`; did you mean `modules\[0\]\.layers`"):
        validate_recipe(recipe)
    recipe = gate_recipe(demo_data, tmp_path, {"reduce": "max"})
    with pytest.raises(RecipeError, match=r"modules\[0\] \(`test_gate`\): reduce must be mean or sum"):
        validate_recipe(recipe)


def test_plugins_that_do_not_import_and_conflicts_are_refused(demo_data, tmp_path):
    recipe = gate_recipe(demo_data, tmp_path)
    recipe["plugins"] = ["tests.no_such_plugin"]
    with pytest.raises(RecipeError, match="plugins: cannot import `tests.no_such_plugin`.*PYTHONPATH"):
        validate_recipe(recipe)
    recipe = gate_recipe(demo_data, tmp_path)
    recipe["modules"].append({"type": "test_gate_refuse"})
    with pytest.raises(RecipeError, match="do not combine: `test_gate_refuse` declares a conflict with `test_gate`"):
        validate_recipe(recipe)
    recipe = gate_recipe(demo_data, tmp_path)
    recipe["modules"].append(dict(recipe["modules"][0]))
    with pytest.raises(RecipeError, match="listed twice"):
        validate_recipe(recipe)


# ----------------------------------------------------------------------------- attach, groups, context


@pytest.mark.parametrize("stage", ["pretrain", "sft", "sft_lora"])
def test_every_trainable_parameter_is_in_exactly_one_group(demo_data, tmp_path, stage):
    recipe, model, _ = built(gate_recipe(demo_data, tmp_path, stage=stage, lr=1e-3))
    apply_stage(model, recipe.stage)
    release_module_parameters(model)
    gates = [p for name, p in model.named_parameters() if name.endswith(".gate")]
    assert len(gates) == 2 and all(p.requires_grad for p in gates)  # trains although the LM is frozen
    groups = param_groups(model, recipe)
    seen = [id(p) for group in groups for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    module_group = next(g for g in groups if g["name"].startswith("module.test_gate"))
    assert {id(p) for p in module_group["params"]} | {id(p) for g in groups if g["name"] == "module.test_gate.no_decay" for p in g["params"]} >= {id(p) for p in gates}


def test_module_lr_falls_back_from_its_option_to_stage_then_train(demo_data, tmp_path):
    recipe_dict = gate_recipe(demo_data, tmp_path, lr=1e-3)
    recipe_dict["stage"]["lr"] = {"modules": 5e-3}
    recipe, model, _ = built(recipe_dict)
    apply_stage(model, recipe.stage)
    release_module_parameters(model)
    lrs = {g["name"]: g["lr"] for g in param_groups(model, recipe)}
    assert lrs["module.test_gate.no_decay"] == 5e-3 and lrs["lm"] == 1e-3
    recipe_dict["modules"][0]["lr"] = 7e-3
    recipe, model, _ = built(recipe_dict)
    apply_stage(model, recipe.stage)
    release_module_parameters(model)
    assert {g["name"]: g["lr"] for g in param_groups(model, recipe)}["module.test_gate.no_decay"] == 7e-3


def test_zero_gate_equals_the_base_and_adapters_disabled_restores_it(demo_data, tmp_path):
    _, model, tokenizer = built(gate_recipe(demo_data, tmp_path))
    base = build_model(validate_recipe(tiny_recipe_dict(demo_data, tmp_path)).model, tokenizer)
    plain = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not k.endswith(".gate")}
    base.load_state_dict(plain)
    batch = make_batch(model, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).hidden_states, base(batch).hidden_states)
        for name, param in model.named_parameters():
            if name.endswith(".gate"):
                param.fill_(0.5)
        gated = model(batch).hidden_states
        assert not torch.allclose(gated, base(batch).hidden_states)
        with model.adapters_disabled():
            with model.adapters_disabled():
                pass
            assert model._adapters_disabled  # the inner exit restored the outer value, not False
            torch.testing.assert_close(model(batch).hidden_states, base(batch).hidden_states)
        assert not model._adapters_disabled
        torch.testing.assert_close(model(batch).hidden_states, gated)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_aux_loss_counted_once_per_forward(demo_data, tmp_path, checkpointing):
    _, model, tokenizer = built(gate_recipe(demo_data, tmp_path, {"aux_weight": 0.25, "reduce": "sum"}))
    model.train()
    if checkpointing:
        model.enable_gradient_checkpointing(vision=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gate"):
                param.fill_(0.1)
    fixture_modules.CALLS.clear()
    out = model(make_batch(model, tokenizer))
    expected = 2 * 0.25 * (1 + 64 * 0.1**2)  # two layers, summed
    assert float(out.aux_losses["test_gate"]) == pytest.approx(expected, rel=1e-6)
    (out.hidden_states.sum() * 0 + out.aux_losses["test_gate"]).backward()
    assert fixture_modules.CALLS["recompute"] == (2 if checkpointing else 0)  # the recompute did run
    gates = [p for name, p in model.named_parameters() if name.endswith(".gate")]
    for gate in gates:  # d/dgate of 0.25 * (1 + |gate|^2) = 0.5 * gate: counted once
        torch.testing.assert_close(gate.grad, 0.5 * gate.detach(), rtol=1e-5, atol=1e-7)
    assert out.aux_metrics["test_gate/layer0/image_tokens"] == model.tokens_per_image


def test_forward_context_roles_spans_and_generator(demo_data, tmp_path):
    _, model, tokenizer = built(gate_recipe(demo_data, tmp_path))
    batch = make_batch(model, tokenizer)
    ctx = ForwardContext.for_batch(batch, model.tokens_per_image, run=RunState(seed=1, step=3, micro_step=0, rank=0))
    n = model.tokens_per_image
    assert ctx.image_spans() == [(0, 0, n, 0)] and int(ctx.image_mask.sum()) == n
    draw = lambda c, **kw: torch.rand(4, generator=c.generator("x", **kw))  # noqa: E731
    assert torch.equal(draw(ctx), draw(ctx))  # asked twice in a forward (or on recompute): the same stream
    later = ForwardContext.for_batch(batch, n, run=RunState(seed=1, step=4, micro_step=0, rank=0))
    other_rank = ForwardContext.for_batch(batch, n, run=RunState(seed=1, step=3, micro_step=0, rank=1))
    assert not torch.equal(draw(ctx), draw(later))
    assert not torch.equal(draw(ctx), draw(other_rank))
    assert torch.equal(draw(ctx, per_rank=False), draw(other_rank, per_rank=False))


# ----------------------------------------------------------------------------- training, checkpoints, export


def test_trains_with_checkpointing_and_packing_and_resumes_exactly(demo_data, tmp_path):
    def recipe(out, **train):
        r = gate_recipe(demo_data, out, {"noise": 0.05}, stage="pretrain", max_steps=4, lr=1e-2, **train)
        r["model"]["gradient_checkpointing"] = True
        r["data"].update(packing=True, max_tokens_per_row=256)
        return validate_recipe(r)

    full = assert_resume_matches(recipe, tmp_path)
    gate_before = load_model_files(full.checkpoint)[0].decoder.layers[0].mlp.gate
    assert gate_before.abs().sum() > 0  # the module trained while the LM stayed frozen
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all("aux/test_gate" in row for row in rows if "loss" in row)

    meta = json.loads((full.checkpoint / "model" / "llava_train_model.json").read_text())
    assert meta["modules"][0]["type"] == "test_gate" and meta["modules"][0]["noise"] == 0.05
    out = export_checkpoint(full.checkpoint, tmp_path / "export")  # `keep`: the llava_train format
    assert (out / "llava_train_model.json").is_file() and not (out / "config.json").exists()
    reloaded, _ = load_model_files(out)
    torch.testing.assert_close(reloaded.decoder.layers[0].mlp.gate, gate_before)


def test_init_from_continues_the_module_or_refuses_other_options(demo_data, tmp_path):
    first = Trainer(validate_recipe(gate_recipe(demo_data, tmp_path / "a", max_steps=1, lr=1e-2))).train()
    recipe, model, _ = built(tiny_recipe_dict(demo_data, tmp_path / "b"))
    message = initialise_from(model, first.checkpoint, None, gate_recipe(demo_data, tmp_path)["modules"])
    assert "module test_gate continues" in message and [m.name for m in model.attachments] == ["test_gate"]
    _, model, _ = built(tiny_recipe_dict(demo_data, tmp_path / "b"))
    with pytest.raises(ValueError, match="module test_gate with other options \\(aux_weight\\)"):
        initialise_from(model, first.checkpoint, None, gate_recipe(demo_data, tmp_path, {"aux_weight": 1.0})["modules"])


def test_export_refused_as_declared(demo_data, tmp_path):
    recipe = gate_recipe(demo_data, tmp_path / "run", max_steps=1)
    recipe["modules"] = [{"type": "test_gate_refuse"}]
    result = Trainer(validate_recipe(recipe)).train()
    with pytest.raises(ValueError, match="test_gate_refuse declares that it cannot be exported"):
        export_checkpoint(result.checkpoint, tmp_path / "export")


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_with_the_module_match_one(demo_data, tmp_path, zero):
    from tests.test_distributed import launch

    def recipe(out, micro, zero_stage):
        r = gate_recipe(demo_data, out / "out", {"aux_weight": 0.01}, max_steps=3, micro_batch_size=micro,
                        zero_stage=zero_stage, lr=1e-2)
        r["model"]["gradient_checkpointing"] = True
        return r

    single = launch(recipe(tmp_path / "one", 8, 0), tmp_path / "one", nproc=1)
    two = launch(recipe(tmp_path / "two", 4, zero), tmp_path / "two", nproc=2)
    assert sorted(two) == [1, 2, 3]
    for step, loss in single.items():
        assert two[step] == pytest.approx(loss, rel=1e-4), step


def test_generation_runs_modules_under_contexts_and_cache_equals_recompute(demo_data, tmp_path):
    from PIL import Image

    from llava_train.generate import Answerer, DecodeOptions
    from llava_train.model import context

    _, model, tokenizer = built(gate_recipe(demo_data, tmp_path))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gate"):
                param.normal_()
    answerer = Answerer(model.eval(), tokenizer, "vicuna_v1")
    images = [Image.new("RGB", (40, 40), (200, 30, 30)), None]
    prompts = ["What colour is the shape?", "Say something."]
    fixture_modules.CALLS.clear()
    cached = answerer.answer(prompts, images, DecodeOptions(max_new_tokens=5))
    assert fixture_modules.CALLS["forward"] >= 2 * 5  # the gate ran at prefill and at every decode step

    # Reference: no cache; each step recomputes the whole sequence under one context whose new tokens are text.
    batch = answerer.prompt_batch(prompts, images)
    stop = set(answerer.template.stop_token_ids)
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        single = answerer.prompt_batch([prompt], [image])
        with context.activate(model.forward_context(single)):
            embeds = model.embed(single)
        roles, tokens = single.token_roles, []
        with torch.no_grad():
            for _ in range(5):
                ctx = context.ForwardContext.for_batch(single, model.tokens_per_image, training=False)
                ctx.token_roles = roles
                with context.activate(ctx):
                    hidden = model.decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
                next_id = int(model.output_embeddings(hidden[:, -1]).argmax(-1))
                if next_id in stop:
                    break
                tokens.append(next_id)
                embeds = torch.cat([embeds, model.lm.get_input_embeddings()(torch.tensor([[next_id]]))], dim=1)
                roles = torch.cat([roles, torch.zeros(1, 1, dtype=roles.dtype)], dim=1)
        assert cached[row] == tokenizer.decode(tokens, skip_special_tokens=True).strip(), row
    assert batch.token_roles[1, 0] == 2  # the text-only row is left-padded in the batch
