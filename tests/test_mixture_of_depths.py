"""mixture_of_depths (p-MoD) invariants against dense and masked references (llava_train/modules/mixture_of_depths.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from llava_train.data.batch import IGNORE_INDEX, Example, TokenRole
from llava_train.data.collate import collate, collate_rows
from llava_train.model import context
from llava_train.model.build import apply_stage, build_model, load_tokenizer
from llava_train.modules.attach import attach_modules, release_module_parameters
from llava_train.modules.mixture_of_depths import (
    MixtureOfDepthsLayer,
    compact_index,
    prd_schedule,
    select_top_k,
)
from llava_train.recipe import ModelConfig, StageConfig
from tests.conftest import TINY_LM, TINY_VISION

FAMILIES = {"llama": {}, "qwen2": {"model_type": "qwen2"}}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def dense_model(tokenizer, family="llama", attn="eager", layers=3):
    lm = {**TINY_LM, **FAMILIES[family], "num_hidden_layers": layers}
    cfg = ModelConfig(vision={"config": dict(TINY_VISION)}, lm={"config": lm}, tokenizer="unused", attn_implementation=attn)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).eval()
    apply_stage(model, StageConfig(name="sft"))
    return model


def with_mod(model, randomise: float = 0.0, **options):
    """A copy of `model` with mixture_of_depths attached (router weights ~ N(0, randomise))."""
    model = copy.deepcopy(model)
    attach_modules(model, [{"type": "mixture_of_depths", **options}])
    release_module_parameters(model)
    if randomise:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in mod_layers(model):
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * randomise)
    return model


def mod_layers(model) -> list[MixtureOfDepthsLayer]:
    return [layer for layer in model.decoder.layers if isinstance(layer, MixtureOfDepthsLayer)]


def example(model, images: int, text: int, offset: int = 0) -> Example:
    ids, labels = [], []
    for i in range(images):
        ids += [model.image_token_id] * model.tokens_per_image + [7 + i]
    ids += [11 + offset + (3 * i) % 50 for i in range(text)]
    labels = [IGNORE_INDEX] * (len(ids) - text) + ids[len(ids) - text:]
    gen = torch.Generator().manual_seed(offset + images)
    return Example(input_ids=ids, labels=labels, images=[torch.randn(3, 32, 32, generator=gen) for _ in range(images)])


def mixed_batch(model, tokenizer):
    """Rows with 2, 1 and 0 images and different lengths (so padding)."""
    rows = [example(model, 2, 5, 0), example(model, 1, 9, 1), example(model, 0, 6, 2)]
    return collate(rows, tokenizer.pad_token_id, model.image_token_id)


def real(batch) -> torch.Tensor:
    return batch.token_roles != int(TokenRole.PAD)


# ----------------------------------------------------------------------------- pure functions


def test_prd_table_reproduces_p_mod_for_32_layers_and_uses_l_minus_1():
    table = prd_schedule(32)
    assert sorted(table) == list(range(8, 32))  # R_l <= 0.85 from layer 8 on
    assert all(table[layer] == 0.15 for layer in range(24, 32))  # clamped
    retention = [table.get(layer, 1.0) for layer in range(32)]
    assert sum(retention) / 32 == pytest.approx(0.5375, abs=1e-12)
    table24 = prd_schedule(24)
    assert table24[23] == 0.15 and table24[12] == pytest.approx(0.5 * torch.cos(torch.tensor(torch.pi * 12 / 23)).item() + 0.5)
    assert min(table24) == 6  # cos(pi * 6 / 23) <= 0.7 < cos(pi * 5 / 23)


def test_top_k_per_sample_and_per_image():
    scores = torch.tensor([[5.0, 1, 4, 3, 0, 2, 9, 9]])
    candidates = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    sample = torch.zeros(1, 8, dtype=torch.long)
    picked = select_top_k(scores, candidates, sample, 0.5)  # floor(6 * 0.5) = 3 of the 6
    assert picked.tolist() == [[True, False, True, True, False, False, False, False]]
    images = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]])
    picked = select_top_k(scores, candidates, images, 0.5)  # floor(3 * 0.5) = 1 per image
    assert picked.tolist() == [[True, False, False, True, False, False, False, False]]
    index, valid = compact_index(torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool))
    assert index[0].tolist() == [0, 2, 3] and index[1, 0] == 1 and valid.tolist() == [[1, 1, 1], [1, 0, 0]]


# ----------------------------------------------------------------------------- the layer against references


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_all_kept_with_zero_router_equals_dense_exactly(tokenizer, family, attn):
    dense = dense_model(tokenizer, family, attn)
    mod = with_mod(dense, schedule="fixed", ratio=1.0)
    batch = mixed_batch(dense, tokenizer)
    with torch.no_grad():
        expected, got = dense(batch).hidden_states, mod(batch).hidden_states
    mask = real(batch)
    assert torch.equal(got[mask], expected[mask])


def layer_io(model, batch, index):
    """(input, output) of decoder layer `index` in one forward."""
    seen = {}
    layer = model.decoder.layers[index]
    handle = layer.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0], y=out, kw=kwargs), with_kwargs=True)
    try:
        model(batch)
    finally:
        handle.remove()
    return seen["x"], seen["y"], seen["kw"]


def weights_of(layer, x):
    return 0.2 * torch.tanh(layer.router(x)) + 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_kept_gives_w_x_for_images_and_dense_text(tokenizer, family):
    dense = dense_model(tokenizer, family)
    mod = with_mod(dense, randomise=0.3, schedule="fixed", ratio=0.0, layers=[1])
    batch = collate([example(dense, 2, 6)], tokenizer.pad_token_id, dense.image_token_id)
    with torch.no_grad():
        x, y, kw = layer_io(mod, batch, 1)
        layer = mod.decoder.layers[1]
        image = batch.token_roles == int(TokenRole.IMAGE)
        torch.testing.assert_close(y[image], (weights_of(layer, x)[..., None] * x)[image], rtol=0, atol=0)
        # the text alone, through the plain layer, at its own positions
        text = ~image[0]
        cos, sin = kw["position_embeddings"]
        n = int(text.sum())
        causal = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]  # eager needs a mask
        with context.activate(mod.forward_context(batch)):
            ref = layer.base_layer(
                x[:, text], attention_mask=causal, position_ids=batch.position_ids[:, text],
                position_embeddings=(cos[:, text], sin[:, text]),
            )
    torch.testing.assert_close(y[:, text], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_image", [False, True])
def test_compact_gather_equals_masked_full_sequence_reference(tokenizer, family, per_image):
    dense = dense_model(tokenizer, family)
    mod = with_mod(dense, randomise=0.5, schedule="fixed", ratio=0.5, layers=[1], per_image=per_image)
    batch = mixed_batch(dense, tokenizer)
    with torch.no_grad():
        x, y, kw = layer_io(mod, batch, 1)
        layer = mod.decoder.layers[1]
        ctx = mod.forward_context(batch)
        image = batch.token_roles == int(TokenRole.IMAGE)
        logits = layer.router(x)
        groups = (image.cumsum(-1) - 1) // dense.tokens_per_image + 100 * torch.arange(3)[:, None] if per_image else batch.sequence_ids
        skip = image & ~select_top_k(logits, image, groups, 0.5)
        w = weights_of(layer, x)
        # reference: the full sequence, skipped tokens removed from every query's keys, STRing on the MLP
        mask = kw["attention_mask"].clone()
        mask = mask.masked_fill(skip[:, None, None, :], torch.finfo(mask.dtype).min)
        ctx.scratch[f"{layer.key}/weights"] = torch.where(image & ~skip, w, 1.0)[..., None]
        with context.activate(ctx):
            ref = layer.base_layer(x, attention_mask=mask, position_ids=kw["position_ids"],
                                   position_embeddings=kw["position_embeddings"])
        ref = torch.where(skip[..., None], w[..., None] * x, ref)
    keep_rows = real(batch)
    assert skip.any() and (image & ~skip).any()
    torch.testing.assert_close(y[keep_rows], ref[keep_rows], rtol=1e-5, atol=1e-5)


def test_router_gets_gradient_from_skipped_alone_and_from_kept_alone(tokenizer):
    dense = dense_model(tokenizer)
    mod = with_mod(dense, randomise=0.3, schedule="fixed", ratio=0.5, layers=[1])
    batch = collate([example(dense, 1, 6)], tokenizer.pad_token_id, dense.image_token_id)
    layer = mod.decoder.layers[1]
    for part in ("skipped", "kept"):
        mod.zero_grad()
        x, y, _ = layer_io(mod.train(), batch, 1)
        image = batch.token_roles == int(TokenRole.IMAGE)
        skip = image & ~select_top_k(layer.router(x), image, batch.sequence_ids, 0.5)
        chosen = skip if part == "skipped" else image & ~skip
        (y[chosen] * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0, part


def test_packed_equals_unpacked(tokenizer):
    dense = dense_model(tokenizer, attn="sdpa")
    mod = with_mod(dense, randomise=0.5, schedule="fixed", ratio=0.5)
    samples = [example(dense, 1, 5, 0), example(dense, 2, 4, 1), example(dense, 1, 7, 2)]
    unpacked = collate(samples, tokenizer.pad_token_id, dense.image_token_id)
    packed = collate_rows([samples[:2], samples[2:]], tokenizer.pad_token_id, dense.image_token_id)
    assert packed.packed
    with torch.no_grad():
        a, b = mod(unpacked).hidden_states, mod(packed).hidden_states
    for sample in range(3):
        torch.testing.assert_close(
            b[packed.sequence_ids == sample], a[unpacked.sequence_ids == sample], rtol=1e-5, atol=1e-5
        )
