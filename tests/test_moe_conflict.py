"""The MoE-LoRA conflict experiment's data and measurements (tests/bench/moe_conflict.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llava_train.data import pipeline
from llava_train.data.batch import TokenRole
from llava_train.model import context
from llava_train.model.build import build_model, load_tokenizer
from llava_train.modules import routing as routing_lib
from llava_train.modules.attach import attach_modules
from llava_train.recipe import validate_recipe
from tests.bench.moe_conflict import (
    CUES, DataSpec, build_conflict_data, correct, in_format, plot_routing, question_records, routing,
)
from tests.conftest import tiny_recipe_dict


def test_domains_differ_only_by_cue_and_answer_format():
    spec = DataSpec(num_train=30, num_eval=30, image_size=32, questions=2, seed=3)
    plain = question_records("sft", 30, replace(spec, caps_fraction=0.0))
    caps = question_records("sft", 30, replace(spec, caps_fraction=1.0))
    bare = question_records("sft", 30, spec, domains=False)  # the base SFT's cue-free form
    for p, c, b in zip(plain, caps, bare):
        assert p["images"][0].tobytes() == c["images"][0].tobytes() == b["images"][0].tobytes()
        assert len(b["conversations"]) == 4  # `questions` turns per image
        for tp, tc, tb in zip(p["conversations"], c["conversations"], b["conversations"]):
            if tb["from"] == "human":
                assert (tp["value"], tc["value"]) == (f"{tb['value']} {CUES['plain']}", f"{tb['value']} {CUES['caps']}")
            else:
                assert (tp["value"], tc["value"]) == (tb["value"], tb["value"].upper()) and tb["value"].islower()
    mixed = question_records("sft", 30, spec)
    assert [r["meta"] for r in mixed] == [r["meta"] for r in question_records("sft", 30, spec)]  # seeded
    assert {r["meta"]["domain"] for r in mixed} == {"plain", "caps"}
    evals = question_records("eval", 30, spec)
    assert all(len(r["conversations"]) == 2 and r["meta"]["answer"] == r["conversations"][1]["value"] for r in evals)
    assert all(r["meta"]["answer"].isupper() == (r["meta"]["domain"] == "caps") for r in evals)


def test_the_swap_conflict_answers_the_partner_attribute_with_the_base_models_words():
    from data_tools.demo_data import QUESTIONS, answers

    spec = DataSpec(num_train=30, num_eval=30, image_size=32, questions=2, seed=3, conflict="swap")
    swap = question_records("sft", 30, replace(spec, caps_fraction=1.0))
    bare = question_records("sft", 30, spec, domains=False)
    asked = {phrasing: qtype for qtype, phrasings in QUESTIONS.items() for phrasing in phrasings}
    for s, b in zip(swap, bare):
        turns = zip(s["conversations"][::2], s["conversations"][1::2], b["conversations"][::2], b["conversations"][1::2])
        for question, answer, bare_question, bare_answer in turns:
            assert question["value"] == f"{bare_question['value']} {CUES['swap']}"
            qtype = asked[bare_question["value"].replace("<image>\n", "")]
            assert answer["value"] != bare_answer["value"] and in_format(answer["value"], "swap", qtype)
            assert in_format(bare_answer["value"], "plain", qtype)  # the words the base SFT teaches
    assert {r["meta"]["domain"] for r in question_records("eval", 30, spec)} == {"plain", "swap"}


def test_accuracy_is_case_sensitive_only_for_caps_and_format_ignores_the_content():
    assert correct("Red.", "red", "plain") and correct("RED", "red", "plain")
    assert correct("RED.", "RED", "caps") and not correct("red", "RED", "caps") and not correct("", "RED", "caps")
    assert in_format("BLUE.", "caps", "colour") and not in_format("blue", "caps", "colour")
    assert not in_format("", "caps", "colour")
    assert in_format("blue", "plain", "colour") and not in_format("BLUE", "plain", "colour")
    assert not in_format("circle", "plain", "colour") and in_format("circle", "swap", "colour")


@pytest.fixture(scope="module")
def conflict_model(tmp_path_factory):
    data = build_conflict_data(tmp_path_factory.mktemp("conflict"), DataSpec(num_train=16, num_eval=24, image_size=32))
    recipe = tiny_recipe_dict(data, data / "unused")
    recipe["modules"] = [{"type": "moe_lora", "experts": 3, "rank": 4}]
    recipe["data"].update(train=[f"{data}/sft/shard-*.tar"], eval=[])
    recipe = validate_recipe(recipe)
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer)
    attach_modules(model, recipe.modules)
    return data, recipe, model.eval(), tokenizer


def test_routing_matrix_weights_every_forward_by_its_tokens(conflict_model, monkeypatch, tmp_path):
    """Forced routing (image tokens -> expert 0, text -> expert 1): the `all` matrix is each domain's share of
    image tokens among its non-padding tokens over all batches, and the answer positions are all text."""
    data, recipe, model, tokenizer = conflict_model
    original = routing_lib.route

    def by_role(logits, top_k, gate, renormalise):
        probs, _, _ = original(logits, top_k, gate, renormalise)
        roles = context.current().token_roles.reshape(-1, 1)
        chosen = (roles != int(TokenRole.IMAGE)).long()
        return probs, chosen, probs.gather(1, chosen)

    monkeypatch.setattr(routing_lib, "route", by_role)
    matrix = routing(model, tokenizer, recipe, data / "eval", batch_size=2)  # 2: batches of unequal length in both domains
    encoder, collate_fn = pipeline.make_encoder(recipe.data, tokenizer, model), pipeline.make_collate(tokenizer, model)
    assert list(matrix["all"]) == ["plain", "caps"]  # the domains built, not every known cue
    for domain in matrix["all"]:
        loader_data = recipe.data.model_copy(update={"eval": [f"{data}/eval/{domain}/shard-*.tar"]})
        roles = [b.token_roles for b in pipeline.eval_loader(loader_data, encoder, collate_fn, 2, 0, 1)]
        image = sum(int((r == int(TokenRole.IMAGE)).sum()) for r in roles)
        counted = sum(int((r != int(TokenRole.PAD)).sum()) for r in roles)
        assert len({r.shape[1] for r in roles}) > 1  # padding differs per batch: the weighting matters
        for layer in ("layer0", "layer1"):
            assert matrix["all"][domain][layer] == pytest.approx([image / counted, 1 - image / counted, 0.0])
            assert matrix["answer"][domain][layer] == pytest.approx([0.0, 1.0, 0.0])
    plot_routing(matrix, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
