"""Export round trip: transformers' Llava gives llava_train's logits, prompts, pixels and answers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from transformers import AutoProcessor, CLIPVisionConfig, LlavaForConditionalGeneration, pipeline

from llava_train.cli import main
from llava_train.data.batch import IGNORE_INDEX, Example
from llava_train.data.collate import collate
from llava_train.data.images import ImageProcessor
from llava_train.generate import Answerer, DecodeOptions
from llava_train.model.build import build_model, load_tokenizer
from llava_train.model.export import export_checkpoint
from llava_train.model.io import META, load_any, load_model_files, save_model_files
from llava_train.model.prompting import checkpoint_prompting
from llava_train.recipe import ModelConfig, validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import TINY_LM, TINY_VISION, tiny_recipe_dict
from tests.test_images import tower_folder  # noqa: F401 (a fixture)

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


# template, recipe system prompt, data.image_mode, tower, LM
PROMPTING = [
    ("plain", None, "pad", TINY_VISION, TINY_LM),
    ("vicuna_v1", None, "pad", TINY_VISION, TINY_LM),
    ("llama3", None, "resize", TINY_VISION, TINY_LM),
    ("chatml", "Answer in one word.", "pad", SIGLIP, QWEN2),
    ("tokenizer", None, "resize", SIGLIP, QWEN2),
]
QUESTION = "What colour is the shape?"


def shapes_image() -> Image.Image:
    image = Image.new("RGB", (48, 30), (240, 240, 240))  # not square: pad and resize differ
    ImageDraw.Draw(image).ellipse((4, 4, 24, 24), fill=(200, 30, 30))
    return image


def random_checkpoint(tokenizer, folder, template, system_prompt, image_mode, vision, lm):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vision={"config": vision}, lm={"config": lm}, tokenizer="x"), tokenizer)
    save_model_files(model.eval(), tokenizer, folder / "model", 0, None, {"type": "mlp"}, template, system_prompt)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"data": {"image_mode": image_mode}}))
    return folder


@pytest.mark.parametrize("template,system_prompt,image_mode,vision,lm", PROMPTING, ids=[c[0] for c in PROMPTING])
def test_transformers_prompting_answers_as_llava_train_generate(
    tokenizer_dir, tmp_path, template, system_prompt, image_mode, vision, lm
):
    """processor.apply_chat_template + generate, and the image-text-to-text pipeline, on the exported
    model: the prompt ids, the pixels and the greedy answers of `llava-train generate`."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    checkpoint = random_checkpoint(tokenizer, tmp_path / "ckpt", template, system_prompt, image_mode, vision, lm)
    export_checkpoint(checkpoint, tmp_path / "hf")
    answerer = Answerer.from_checkpoint(checkpoint)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    pipe = pipeline("image-text-to-text", model=str(tmp_path / "hf"))
    answers = []
    for image in (shapes_image(), None):
        parts = [{"type": "image", "image": image}] if image is not None else []
        messages = [{"role": "user", "content": parts + [{"type": "text", "text": QUESTION}]}]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        prompt = answerer.template.prompt_ids(QUESTION, llava.config.image_seq_length, has_image=image is not None)
        assert llava.generation_config.eos_token_id == answerer.template.stop_token_ids
        assert inputs["input_ids"][0].tolist() == prompt
        if image is not None:
            torch.testing.assert_close(inputs["pixel_values"][0], answerer.images(image), atol=1e-5, rtol=0)
        ours = answerer.answer([QUESTION], [image], DecodeOptions(max_new_tokens=6))[0]
        with torch.no_grad():
            out = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
        direct = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        piped = pipe(text=messages, max_new_tokens=6, return_full_text=False)[0]["generated_text"].strip()
        assert ours == direct == piped
        answers.append(ours)
    assert any(answers)  # random weights, but not stopping at once: the stop tokens are not all that matched


def test_checkpoints_without_a_recorded_template_fall_back_to_their_recipe(tokenizer_dir, tower_folder, tmp_path):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    checkpoint = random_checkpoint(tokenizer, tmp_path / "ckpt", None, None, "pad", TINY_VISION, TINY_LM)
    data = {"template": "chatml", "system_prompt": "Be brief.", "image_mode": "resize"}
    (checkpoint / "recipe.yaml").write_text(yaml.safe_dump({"data": data, "model": {"vision": {"path": str(tower_folder)}}}))
    how = checkpoint_prompting(checkpoint, CLIPVisionConfig(image_size=32))
    assert (how.template, how.system_prompt, how.image_mode) == ("chatml", "Be brief.", "resize")
    assert how.images.mean == (0.2, 0.3, 0.4) and how.images.shortest_edge == 40  # the recipe's tower folder
    # The checkpoint's own copy of the image settings wins over the recipe's tower folder.
    ImageProcessor(32, (0.5,) * 3, (0.5,) * 3, square=True).save_pretrained(checkpoint / "model" / "vision")
    assert checkpoint_prompting(checkpoint, CLIPVisionConfig(image_size=32)).images.square


@pytest.mark.slow
def test_a_trained_checkpoint_exports_its_template_and_its_towers_images(demo_data, tower_folder, tmp_path, capsys):
    """The demo's path: train (a pretrained tower folder with its own processor), export, then the
    pipeline answers as `llava-train generate` does."""
    recipe = tiny_recipe_dict(demo_data, tmp_path / "run", max_steps=1)
    recipe["model"]["vision"] = {"path": str(tower_folder), "feature_layer": -2}
    recipe["data"].update(image_mode="resize", system_prompt="Answer in one word.")
    checkpoint = Trainer(validate_recipe(recipe)).train().checkpoint
    meta = json.loads((checkpoint / "model" / META).read_text())
    assert (meta["template"], meta["system_prompt"]) == ("vicuna_v1", "Answer in one word.")
    saved = checkpoint_prompting(checkpoint, CLIPVisionConfig(image_size=32)).images
    assert (saved.shortest_edge, saved.mean, saved.mode) == (40, (0.2, 0.3, 0.4), "resize")  # the tower's own

    image = tmp_path / "shapes.png"
    shapes_image().save(image)
    assert main(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["generate", str(checkpoint), "--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "6"]) == 0
    generated = capsys.readouterr().out.strip()
    pipe = pipeline("image-text-to-text", model=str(tmp_path / "hf"))
    messages = [{"role": "user", "content": [{"type": "image", "url": str(image)}, {"type": "text", "text": QUESTION}]}]
    answer = pipe(text=messages, max_new_tokens=6, return_full_text=False)[0]["generated_text"].strip()
    assert answer == generated and answer
