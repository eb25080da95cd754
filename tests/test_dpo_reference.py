"""Precomputed DPO reference log-probs (llava_train/objectives/dpo_reference.py, dpo_precompute.py): equal to a
live reference in loss and gradients, refused when what they depend on changes, resumed after an interruption."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from llava_train.cli import main
from llava_train.model.build import build_model, load_tokenizer
from llava_train.objectives import BuildContext, build_objective
from llava_train.objectives import dpo_precompute, dpo_reference
from llava_train.recipe import RecipeError, validate_recipe
from llava_train.train.trainer import Trainer
from tests.test_dpo import dpo_recipe, randomise_lora_b
from tests.test_groups import pair_shards  # noqa: F401  (a fixture: convert-pairs output)


@pytest.fixture
def shards(pair_shards, tmp_path) -> list[str]:  # noqa: F811
    """A private copy of the pair shards: the cache files are written beside them."""
    folder = tmp_path / "shards"
    shutil.copytree(Path(pair_shards[0]).parent, folder)
    return sorted(str(p) for p in folder.glob("*.tar"))


def recipe(demo_data, out, shards, **objective):
    return validate_recipe(dpo_recipe(demo_data, out, shards, objective))


def loss_and_grads(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """The objective on the first micro-batch, with LoRA B drawn at random so that the policy differs from
    its adapters-disabled reference (at B = 0 they are equal and the margins zero)."""
    randomise_lora_b(trainer.model)
    batch = next(iter(trainer.loader))
    out = trainer.objective(trainer.model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return float(out.loss_sum.detach()), grads


def test_precomputed_equals_live_reference(demo_data, tmp_path, shards):
    live = Trainer(recipe(demo_data, tmp_path / "live", shards))
    assert not live.objective.frozen and live.objective.precomputed is None  # adapters-disabled reference
    written = dpo_precompute.precompute(recipe(demo_data, tmp_path / "pre", shards), progress=False)["written"]
    assert written == shards and all(dpo_reference.cache_path(s).is_file() for s in shards)
    pre = Trainer(recipe(demo_data, tmp_path / "pre", shards, precomputed_reference=True))
    assert pre.objective.precomputed is not None and not pre.objective.frozen  # no reference model
    live_loss, live_grads = loss_and_grads(live)
    pre_loss, pre_grads = loss_and_grads(pre)
    assert live_loss > 0.1 and pre_loss == pytest.approx(live_loss, rel=1e-5)
    assert live_grads.keys() == pre_grads.keys() and any("lora_A" in n for n in live_grads)
    for name, grad in live_grads.items():
        torch.testing.assert_close(pre_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    stored = dpo_reference.read_cache(dpo_reference.cache_path(shards[0]))["pairs"]
    entry = next(iter(stored.values()))["chosen"]
    assert entry["sum"] == pytest.approx(float(entry["tokens"].sum()), rel=1e-5)
    assert entry["mean"] == pytest.approx(entry["sum"] / entry["tokens"].numel(), rel=1e-6)


def changed_tokenizer(demo_data, tmp_path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(demo_data / "tokenizer")
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return str(tmp_path / "tokenizer")


@pytest.mark.parametrize("field,change", [
    ("reference", lambda d, tmp: {"train": {"seed": 1}}),  # the initial policy, built from the recipe: redrawn
    ("tokenizer", lambda d, tmp: {"model": {"tokenizer": changed_tokenizer(d, tmp)}}),
    ("template", lambda d, tmp: {"data": {"system_prompt": "Answer in one word."}}),
    ("image preprocessing", lambda d, tmp: {"data": {"image_mode": "resize"}}),
    ("truncation", lambda d, tmp: {"data": {"max_length": 120}}),
])
def test_a_changed_key_is_refused_naming_what_differs(demo_data, tmp_path, shards, field, change):
    base = dpo_recipe(demo_data, tmp_path / "out", shards, {"precomputed_reference": True})
    dpo_precompute.precompute(validate_recipe(base), progress=False)
    objective(validate_recipe(base))  # unchanged: accepted
    changed = base
    for section, values in change(demo_data, tmp_path).items():
        changed = {**changed, section: {**changed[section], **values}}
    others = [f for f in ("reference", "tokenizer", "template", "image preprocessing", "truncation") if f != field]
    with pytest.raises(ValueError, match=f"written for another {field} than") as refused:
        objective(validate_recipe(changed))
    named = str(refused.value).split("written for another ")[1].split(" than")[0]
    assert named == field and not any(other in named for other in others)


def objective(recipe):
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    model = build_model(recipe.model, tokenizer)
    return build_objective(recipe.stage.objective, BuildContext(recipe, tokenizer, model))


def test_precompute_resumes_after_an_interruption(demo_data, tmp_path, shards, monkeypatch, capsys):
    pre = recipe(demo_data, tmp_path / "out", shards, precomputed_reference=True)
    clean = dpo_precompute.precompute(pre, progress=False)
    expected = {s: dpo_reference.read_cache(dpo_reference.cache_path(s))["pairs"] for s in shards}
    for s in shards[3:]:
        dpo_reference.cache_path(s).unlink()  # as if stopped after three shards
    real, calls = dpo_precompute.shard_logprobs, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped in the middle of the sixth shard
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo_precompute, "shard_logprobs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dpo_precompute.precompute(pre, progress=False)
    assert [dpo_reference.cache_path(s).is_file() for s in shards] == [True] * 5 + [False] * (len(shards) - 5)
    assert not list(dpo_reference.cache_path(shards[0]).parent.glob("*.partial"))  # a file is whole or absent
    monkeypatch.setattr(dpo_precompute, "shard_logprobs", real)
    (tmp_path / "recipe.yaml").write_text(pre.to_yaml())
    assert main(["dpo-precompute", str(tmp_path / "recipe.yaml")]) == 0  # the command, resuming
    assert f"wrote {len(shards) - 5} shard files, kept 5 done earlier" in capsys.readouterr().out
    assert clean["written"] == shards
    for s in shards:
        got = dpo_reference.read_cache(dpo_reference.cache_path(s))["pairs"]
        assert got.keys() == expected[s].keys()
        for record_id, members in got.items():
            for member, values in members.items():
                torch.testing.assert_close(values["tokens"], expected[s][record_id][member]["tokens"])


def test_precomputed_needs_no_adapters_but_refuses_mdpo(demo_data, tmp_path, shards):
    validate_recipe(dpo_recipe(demo_data, tmp_path, shards, {"precomputed_reference": True}, stage="sft"))
    with pytest.raises(RecipeError, match="mdpo scores the chosen answer with a corrupted image"):
        validate_recipe(dpo_recipe(demo_data, tmp_path, shards, {"precomputed_reference": True, "mdpo": {}}))


def test_missing_cache_files_are_named(demo_data, tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="run `llava-train dpo-precompute RECIPE` first"):
        objective(recipe(demo_data, tmp_path, shards, precomputed_reference=True))


# ----------------------------------------------------------------------------- a checkpoint (e.g. the KD teacher)


@pytest.fixture(scope="module")
def teacher(demo_data, tmp_path_factory) -> str:
    """A checkpoint trained with the vicuna_v1 template on the demo tokenizer: a stand-in KD teacher."""
    return str(Trainer(recipe_with(demo_data, tmp_path_factory.mktemp("teacher"))).train().checkpoint)


def recipe_with(demo_data, out, seed: int = 0):
    """A one-step vicuna_v1 run on the demo data (the teacher's recipe)."""
    from tests.conftest import tiny_recipe_dict

    raw = tiny_recipe_dict(demo_data, out, max_steps=1)
    raw["data"]["eval"] = []
    raw["train"]["seed"] = seed
    return validate_recipe(raw)


def test_a_checkpoint_reference_such_as_a_kd_teacher(demo_data, tmp_path, shards, teacher):
    built = objective(recipe(demo_data, tmp_path, shards, reference=teacher))
    assert "reference" in built.frozen and not any(p.requires_grad for p in built.frozen.parameters())
    pre = recipe(demo_data, tmp_path, shards, reference=teacher, precomputed_reference=True)
    dpo_precompute.precompute(pre, progress=False)
    assert dpo_reference.read_cache(dpo_reference.cache_path(shards[0]))["reference"] == teacher
    assert not objective(pre).frozen  # trained from the teacher's precomputed log-probs: no model


def test_a_copied_reference_checkpoint_is_the_same_reference_and_a_retrained_one_is_not(
    demo_data, tmp_path, shards, teacher
):
    dpo_precompute.precompute(recipe(demo_data, tmp_path, shards, reference=teacher, precomputed_reference=True),
                              progress=False)  # fmt: skip
    copy = tmp_path / "copied_teacher"
    shutil.copytree(teacher, copy)
    objective(recipe(demo_data, tmp_path, shards, reference=str(copy), precomputed_reference=True))  # accepted
    retrained = Trainer(recipe_with(demo_data, tmp_path / "retrained", seed=1)).train().checkpoint
    with pytest.raises(ValueError, match="written for another reference than this recipe's"):
        objective(recipe(demo_data, tmp_path, shards, reference=str(retrained), precomputed_reference=True))


def test_a_reference_with_another_template_or_tokenizer_is_refused(demo_data, tmp_path, shards, teacher):
    other_template = dpo_recipe(demo_data, tmp_path, shards, {"reference": teacher})
    other_template["data"]["template"] = "plain"
    with pytest.raises(RecipeError, match="trained with template 'vicuna_v1'.*set data.template=vicuna_v1"):
        validate_recipe(other_template)
    other_tokenizer = dpo_recipe(demo_data, tmp_path, shards, {"reference": teacher})
    other_tokenizer["model"]["tokenizer"] = changed_tokenizer(demo_data, tmp_path)
    with pytest.raises(ValueError, match="has another tokenizer than the policy"):
        objective(validate_recipe(other_tokenizer))
