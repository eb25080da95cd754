"""The assembled model: placeholder expansion, text-only batches, frozen parts, stages, LoRA targets."""

from __future__ import annotations

import pytest
import torch

from llava_train.data.batch import IGNORE_INDEX, Example
from llava_train.data.collate import collate
from llava_train.model.build import apply_stage, build_model, load_tokenizer
from llava_train.recipe import ModelConfig, StageConfig
from tests.conftest import TINY_LM, TINY_VISION


@pytest.fixture
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def make_model(tokenizer, vision=TINY_VISION, lm=TINY_LM, **extra):
    cfg = ModelConfig(vision={"config": dict(vision), **extra}, lm={"config": dict(lm)}, tokenizer="unused")
    torch.manual_seed(0)
    return build_model(cfg, tokenizer)


def make_batch(model, tokenizer, with_image: bool = True):
    text = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    image_ids = [model.image_token_id] * model.tokens_per_image if with_image else []
    ids = image_ids + text
    images = [torch.randn(3, 32, 32)] if with_image else []
    example = Example(input_ids=ids, labels=[IGNORE_INDEX] * len(image_ids) + text, images=images)
    return collate([example], tokenizer.pad_token_id, model.image_token_id)


def test_image_placeholders_are_replaced_by_connector_outputs(tokenizer):
    model = make_model(tokenizer)
    batch = make_batch(model, tokenizer)
    embeds = model.embed(batch)
    visual = model.encode_images(batch.pixel_values)
    n = model.tokens_per_image
    assert torch.allclose(embeds[0, :n], visual[0])
    text_embeds = model.lm.get_input_embeddings()(batch.input_ids[:, n:])
    assert torch.allclose(embeds[0, n:], text_embeds[0])
    assert model.tokens_per_image == (32 // 8) ** 2  # CLS dropped by default


def test_use_cls_keeps_the_class_token(tokenizer):
    model = make_model(tokenizer, use_cls=True)
    assert model.tokens_per_image == (32 // 8) ** 2 + 1


def test_text_only_batch_trains_without_breaking(tokenizer):
    model = make_model(tokenizer)
    apply_stage(model, StageConfig(name="sft"))
    batch = make_batch(model, tokenizer, with_image=False)
    assert batch.pixel_values is None
    model(batch).hidden_states.sum().backward()
    grad = model.connector.linear_1.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0  # reached, with zero weight


def test_placeholder_count_mismatch_names_the_fix(tokenizer):
    model = make_model(tokenizer)
    batch = make_batch(model, tokenizer)
    batch.input_ids[0, 0] = tokenizer.pad_token_id  # one placeholder short
    with pytest.raises(ValueError, match="placeholder tokens"):
        model.embed(batch)


def test_frozen_tower_keeps_no_activations(tokenizer):
    model = make_model(tokenizer)
    apply_stage(model, StageConfig(name="pretrain"))
    batch = make_batch(model, tokenizer)
    features = model.vision(batch.pixel_values)
    assert features.requires_grad is False
    out = model.encode_images(batch.pixel_values)
    assert out.requires_grad  # the connector trains
    assert out.grad_fn.next_functions  # ...but the graph stops at the connector's input
    leaves = _graph_leaf_params(out)
    assert leaves <= {id(p) for p in model.connector.parameters()}


def _graph_leaf_params(tensor) -> set[int]:
    seen, stack, leaves = set(), [tensor.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


@pytest.mark.parametrize(
    "stage,expect",
    [
        ("pretrain", {"vision": False, "connector": True, "lm": False}),
        ("sft", {"vision": False, "connector": True, "lm": True}),
    ],
)
def test_stage_presets(tokenizer, stage, expect):
    model = make_model(tokenizer)
    apply_stage(model, StageConfig(name=stage))
    for part, module in model.parts().items():
        assert all(p.requires_grad == expect[part] for p in module.parameters()), part


def test_stage_override_trains_the_tower(tokenizer):
    model = make_model(tokenizer)
    apply_stage(model, StageConfig(name="sft", trainable={"vision": True}))
    assert all(p.requires_grad for p in model.vision.parameters())


def test_lora_targets_lm_modules_by_full_name_only(tokenizer):
    model = make_model(tokenizer)
    apply_stage(model, StageConfig(name="sft_lora", lora={"target_modules": ["q_proj", "v_proj", "out_proj"]}))
    lora_names = [n for n, p in model.named_parameters() if "lora_" in n]
    assert lora_names and all(n.startswith("lm.") for n in lora_names)
    assert not any("lora_" in n for n, _ in model.vision.named_parameters())  # CLIP has out_proj too
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("connector.") for n in trainable)


def test_pretrained_parts_load_from_local_folders(tokenizer, tmp_path):
    """The real-checkpoint path: save tiny HF models, then build from their folders."""
    source = make_model(tokenizer)
    source.vision.encoder.save_pretrained(tmp_path / "vision")
    source.lm.save_pretrained(tmp_path / "lm")
    cfg = ModelConfig(vision={"path": str(tmp_path / "vision")}, lm={"path": str(tmp_path / "lm")}, tokenizer="x")
    loaded = build_model(cfg, tokenizer)
    for part in ("lm", "vision"):
        want, got = getattr(source, part).state_dict(), getattr(loaded, part).state_dict()
        assert got.keys() == want.keys(), part
        for name, tensor in want.items():  # by name: a zip of two orders could pair different tensors
            assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("feature_layer", [-2, 1, -1])
def test_tower_runs_only_the_layers_it_reads(tokenizer, feature_layer):
    model = make_model(tokenizer, vision={**TINY_VISION, "num_hidden_layers": 3}, feature_layer=feature_layer)
    pixels = torch.randn(2, 3, 32, 32)
    calls = []
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in model.vision.encoder.encoder.layers]
    features = model.vision(pixels)
    for hook in hooks:
        hook.remove()
    assert len(calls) == model.vision.layers_used == feature_layer % 4
    full = model.vision.encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer][:, 1:]
    torch.testing.assert_close(features, full)
    assert len(model.vision.encoder.encoder.layers) == 3  # nothing was removed for good
