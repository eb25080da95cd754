"""Stages chain through `stage.init_from` whatever each one trains: full weights or LoRA adapters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from llava_train.model.build import apply_stage, build_model, load_tokenizer
from llava_train.model.export import export_checkpoint
from llava_train.model.io import initialise_from, load_model_files
from llava_train.model.lora import add_lora, merge_lora_state
from llava_train.recipe import LoraConfig, RecipeError, validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.test_model import make_batch

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def run_stage(demo_data, out, name, init_from=None, **stage):
    recipe = tiny_recipe_dict(demo_data, out, max_steps=2, lr=1e-2)
    recipe["stage"] = {"name": name, "init_from": str(init_from) if init_from else None, **stage}
    recipe["data"]["eval"] = []
    return Trainer(validate_recipe(recipe)).train().checkpoint


def logits(model, batch):
    with torch.no_grad():
        return model.output_embeddings(model(batch).hidden_states)


def hf_logits(folder, batch, adapter=None):
    hf = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    if adapter is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values).logits


@pytest.mark.slow
def test_pretrain_lora_sft_export_chain(demo_data, tmp_path):
    pretrain = run_stage(demo_data, tmp_path / "pretrain", "pretrain")
    lora = run_stage(demo_data, tmp_path / "lora", "sft_lora", pretrain, lora=LORA)
    assert any(k.endswith("lora_B.default.weight") for k in load_file(str(lora / "model" / "model.safetensors")))
    sft = run_stage(demo_data, tmp_path / "sft", "sft", lora)  # LoRA folded in: the sft model has plain names
    assert not any("lora_" in k for k in load_file(str(sft / "model" / "model.safetensors")))
    model, tokenizer = load_model_files(sft)
    batch = make_batch(model, tokenizer)
    export_checkpoint(sft, tmp_path / "hf")
    torch.testing.assert_close(hf_logits(tmp_path / "hf", batch), logits(model, batch), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_sft_then_lora_exported_keeping_the_adapter(demo_data, tmp_path):
    sft = run_stage(demo_data, tmp_path / "sft", "sft")
    lora = run_stage(demo_data, tmp_path / "lora", "sft_lora", sft, lora=LORA)  # a full checkpoint into sft_lora
    unmerged, tokenizer = load_model_files(lora, merge=False)
    batch = make_batch(unmerged, tokenizer)
    export_checkpoint(lora, tmp_path / "hf", keep_lora=True)
    ours = logits(unmerged, batch)
    assert not torch.allclose(hf_logits(tmp_path / "hf", batch), ours, atol=1e-4)  # the adapters matter
    torch.testing.assert_close(hf_logits(tmp_path / "hf", batch, tmp_path / "hf" / "adapter"), ours, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def lora_checkpoint(demo_data, tmp_path_factory):
    return run_stage(demo_data, tmp_path_factory.mktemp("lora"), "sft_lora", lora=LORA)


def fresh_model(demo_data, tmp_path):
    recipe = validate_recipe(tiny_recipe_dict(demo_data, tmp_path))
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    return build_model(recipe.model, tokenizer), tokenizer


@pytest.mark.slow
def test_lora_checkpoint_continues_or_merges(demo_data, tmp_path, lora_checkpoint):
    trained, tokenizer = load_model_files(lora_checkpoint, merge=False)
    batch = make_batch(trained, tokenizer)
    expected = logits(trained, batch)

    same, _ = fresh_model(demo_data, tmp_path)
    message = initialise_from(same, lora_checkpoint, LoraConfig(**LORA))
    assert "continue" in message and hasattr(same.lm, "peft_config")
    torch.testing.assert_close(logits(same, batch), expected)

    merged, _ = fresh_model(demo_data, tmp_path)
    message = initialise_from(merged, lora_checkpoint, None)
    assert "merged" in message and not hasattr(merged.lm, "peft_config")
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=1e-5)

    other = LoraConfig(**{**LORA, "r": 2})  # other adapters: the old ones fold in, fresh ones start at zero
    refit, _ = fresh_model(demo_data, tmp_path)
    message = initialise_from(refit, lora_checkpoint, other)
    assert "merged" in message and "fresh" in message
    stage = validate_recipe(tiny_recipe_dict(demo_data, tmp_path) | {"stage": {"name": "sft_lora", "lora": other.model_dump()}}).stage
    apply_stage(refit, stage)
    torch.testing.assert_close(logits(refit, batch), expected, atol=1e-5, rtol=1e-5)


def test_merge_lora_state_equals_peft_merge(demo_data, tmp_path):
    model, _ = fresh_model(demo_data, tmp_path)
    model.lm = add_lora(model.lm, LoraConfig(**LORA))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    state = merge_lora_state(model.state_dict(), LoraConfig(**LORA))
    model.lm = model.lm.merge_and_unload()
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, atol=1e-6, rtol=1e-6, msg=name)


def test_sft_lora_without_the_lm_is_refused(demo_data, tmp_path):
    recipe = tiny_recipe_dict(demo_data, tmp_path)
    recipe["stage"] = {"name": "sft_lora", "trainable": {"lm": False}}
    with pytest.raises(RecipeError, match="stage.name=pretrain"):
        validate_recipe(recipe)
