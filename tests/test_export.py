"""Export round trip: transformers' LlavaForConditionalGeneration gives llava_train's logits."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from llava_train.data.batch import IGNORE_INDEX, Example
from llava_train.data.collate import collate
from llava_train.model.build import build_model, load_tokenizer
from llava_train.model.export import export_checkpoint
from llava_train.model.io import load_any, load_model_files, save_model_files
from llava_train.recipe import ModelConfig
from tests.conftest import TINY_LM, TINY_VISION

SIGLIP = {**TINY_VISION, "model_type": "siglip_vision_model"}
QWEN2 = {**TINY_LM, "model_type": "qwen2"}


@pytest.mark.parametrize("vision,lm", [(TINY_VISION, TINY_LM), (SIGLIP, QWEN2)], ids=["clip-llama", "siglip-qwen2"])
def test_export_round_trip_gives_equal_logits(tokenizer_dir, tmp_path, vision, lm):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    model = build_model(ModelConfig(vision={"config": vision}, lm={"config": lm}, tokenizer="x"), tokenizer).eval()
    save_model_files(model, tokenizer, tmp_path / "ckpt" / "model", rank=0, lora=None, connector={"type": "mlp"})
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")

    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    reloaded, _ = load_model_files(tmp_path / "ckpt")
    text = tokenizer("what colour is the circle", add_special_tokens=False)["input_ids"]
    ids = [model.image_token_id] * model.tokens_per_image + text
    examples = [
        Example(input_ids=ids, labels=[IGNORE_INDEX] * len(ids), images=[torch.randn(3, 32, 32)]),
        Example(input_ids=ids[:-2], labels=[IGNORE_INDEX] * (len(ids) - 2), images=[torch.randn(3, 32, 32)]),
    ]
    batch = collate(examples, tokenizer.pad_token_id, model.image_token_id)
    with torch.no_grad():
        ours = reloaded.output_embeddings(reloaded(batch).hidden_states)
        theirs = hf(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits
        original = model.output_embeddings(model(batch).hidden_states)
        imported, _ = load_any(tmp_path / "hf")  # and back: an exported folder as a second model or for eval
        back = imported.output_embeddings(imported(batch).hidden_states)
    real = batch.attention_mask.bool()
    assert torch.allclose(ours[real], original[real], atol=1e-6)
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back[real], ours[real], atol=1e-5, rtol=1e-5)
