"""LoRA through peft: only adapters (+ connector) train, checkpoints keep them, merging preserves outputs."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from llava_train.model.export import export_checkpoint
from llava_train.model.io import load_model_files
from llava_train.recipe import validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.test_model import make_batch


def train_lora(demo_data, out):
    recipe = tiny_recipe_dict(demo_data, out, max_steps=3, lr=1e-2)
    recipe["stage"] = {"name": "sft_lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    return Trainer(validate_recipe(recipe)).train()


def test_sft_lora_trains_adapters_and_merges_exactly(demo_data, tmp_path):
    result = train_lora(demo_data, tmp_path / "run")

    state = load_file(str(result.checkpoint / "model" / "model.safetensors"))
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and any(state[k].abs().sum() > 0 for k in lora_b)  # adapters moved off their zero init

    unmerged, tokenizer = load_model_files(result.checkpoint, merge=False)
    merged, _ = load_model_files(result.checkpoint, merge=True)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    batch = make_batch(merged, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(batch).hidden_states, unmerged(batch).hidden_states, atol=1e-5, rtol=1e-5)
        ours = merged.output_embeddings(merged(batch).hidden_states)

    export_checkpoint(result.checkpoint, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    torch.testing.assert_close(theirs.logits, ours, atol=1e-4, rtol=1e-4)


def test_export_keeping_lora_as_a_peft_adapter(demo_data, tmp_path):
    from peft import PeftModel

    result = train_lora(demo_data, tmp_path / "run")
    export_checkpoint(result.checkpoint, tmp_path / "hf", keep_lora=True)
    unmerged, tokenizer = load_model_files(result.checkpoint, merge=False)
    batch = make_batch(unmerged, tokenizer)
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    with torch.no_grad():
        ours = unmerged.output_embeddings(unmerged(batch).hidden_states)
        without_adapter = base(**inputs).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
        with_adapter = adapted(**inputs).logits
    assert not torch.allclose(without_adapter, ours, atol=1e-4)  # the base alone lacks the trained adapters
    torch.testing.assert_close(with_adapter, ours, atol=1e-4, rtol=1e-4)
