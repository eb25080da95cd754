"""mixture_of_depths (p-MoD) invariants against dense and masked references (llava_train/modules/mixture_of_depths.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from llava_train.data.batch import IGNORE_INDEX, Example, TokenRole
from llava_train.data.collate import collate, collate_rows
from llava_train.generate import left_padded
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
from llava_train.train.flops import StepFlops
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
@pytest.mark.parametrize("padding", [True, False])  # SDPA without padding: the decoder passes no mask (causal)
def test_all_kept_with_zero_router_equals_dense_exactly(tokenizer, family, attn, padding):
    dense = dense_model(tokenizer, family, attn)
    mod = with_mod(dense, schedule="fixed", ratio=1.0)
    if padding:
        batch = mixed_batch(dense, tokenizer)
    else:
        batch = collate([example(dense, 1, 5, 0), example(dense, 1, 5, 3)], tokenizer.pad_token_id, dense.image_token_id)
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
        # reference: the full sequence, skipped tokens removed from every query's keys; STRing from the
        # plain layer's output and its MLP's: h + w * m = (h + m) + (w - 1) * m
        mask = kw["attention_mask"].clone()
        mask = mask.masked_fill(skip[:, None, None, :], torch.finfo(mask.dtype).min)
        mlp_out = {}
        handle = layer.base_layer.mlp.register_forward_hook(lambda m, args, out: mlp_out.update(m=out))
        with context.activate(ctx):  # a fresh context: the module's own MLP hook does not scale
            plain = layer.base_layer(x, attention_mask=mask, position_ids=kw["position_ids"],
                                     position_embeddings=kw["position_embeddings"])
        handle.remove()
        kept_image = (image & ~skip)[..., None]
        ref = torch.where(kept_image, plain + (w[..., None] - 1) * mlp_out["m"], plain)
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
    # floor(16 * 0.3) + floor(32 * 0.3) = 13 per sample, but floor(48 * 0.3) = 14 for their packed row
    mod = with_mod(dense, randomise=0.5, schedule="fixed", ratio=0.3)
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


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_decoding_equals_recomputation(tokenizer, family, attn):
    """Greedy decoding through transformers' generate (prefill caches n_text + k_l per MoD layer, new
    tokens run dense against it) gives the logits of a full forward over prompt + generated tokens."""
    mod = with_mod(dense_model(tokenizer, family, attn, layers=4), randomise=0.5, schedule="fixed", ratio=0.5)
    rows = [example(mod, 1, 4, 0), example(mod, 2, 6, 1)]  # different lengths: left padding
    batch = left_padded(collate(rows, tokenizer.pad_token_id, mod.image_token_id))
    prompt = mod.forward_context(batch)
    with torch.no_grad():
        with context.activate(prompt):
            embeds = mod.embed(batch)
        with context.during_generation(mod.decoder, prompt):
            out = mod.lm.generate(
                inputs_embeds=embeds, attention_mask=batch.attention_mask, max_new_tokens=4, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=None, use_cache=True,
                return_dict_in_generate=True, output_logits=True,
            )
        cache = out.past_key_values
        image = batch.token_roles == int(TokenRole.IMAGE)
        for layer in mod_layers(mod):  # the prompt's compact row (n_text + pads + k_l) plus each new token but the last
            kept = (~image).sum(1) + torch.floor(image.sum(1) * 0.5).long()
            assert cache.layers[layer.cache_index].get_seq_length() == int(kept.max()) + 3
        assert cache.layers[0].get_seq_length() == batch.input_ids.shape[1] + 3  # layer 0 stays dense
        new = out.sequences[:, -4:]
        for step in range(4):
            tokens = new[:, :step]
            full = torch.cat([embeds, mod.lm.get_input_embeddings()(tokens)], dim=1)
            grow = lambda t, extra: torch.cat([t, extra], dim=1)  # noqa: E731
            ctx = dataclasses.replace(
                prompt,
                token_roles=grow(batch.token_roles, torch.full(tokens.shape, int(TokenRole.TEXT), dtype=torch.int8)),
                sequence_ids=grow(batch.sequence_ids, batch.sequence_ids[:, -1:].expand(-1, step)),
                position_ids=grow(batch.position_ids, batch.position_ids[:, -1:] + torch.arange(1, step + 1)),
                scratch={},
            )
            with context.activate(ctx):
                hidden = mod.decoder(
                    inputs_embeds=full, attention_mask=grow(batch.attention_mask, torch.ones_like(tokens)),
                    position_ids=ctx.position_ids,
                ).last_hidden_state
            torch.testing.assert_close(out.logits[step], mod.lm.lm_head(hidden[:, -1]), rtol=1e-4, atol=1e-4)


def test_fully_masked_rows_give_no_nan(tokenizer):
    """Padding queries the decoder's mask leaves without keys (left padding, SDPA) and filler slots of short
    compact rows attend to themselves: no NaN forward or backward."""
    mod = with_mod(dense_model(tokenizer, attn="sdpa"), randomise=0.5, schedule="fixed", ratio=0.25)
    rows = [example(mod, 2, 3, 0), example(mod, 0, 2, 1)]
    batch = left_padded(collate(rows, tokenizer.pad_token_id, mod.image_token_id))
    mod.train()
    out = mod(batch).hidden_states
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters() if p.grad is not None)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenizer):
    base = with_mod(dense_model(tokenizer, attn="sdpa"), randomise=0.5, schedule="fixed", ratio=0.5)
    batch = mixed_batch(base, tokenizer)
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base).train()
        if checkpointing:
            model.enable_gradient_checkpointing(vision=False)
        out = model(batch)
        (out.hidden_states * torch.linspace(-1, 1, out.hidden_states.shape[-1])).sum().backward()
        results.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
        if checkpointing:
            assert model.decoder.layers[1].base_layer.gradient_checkpointing
    assert results[0].keys() == results[1].keys() and any("router" in name for name in results[0])
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("stage", [StageConfig(name="sft"), StageConfig(name="sft", trainable={"lm": False})],
                         ids=["lm_trains", "lm_frozen"])
@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_step_flops_count_only_the_tokens_mod_layers_run(tokenizer, stage, ratio):
    """Against torch's FLOP counter on a real training step (eager attention, rows without padding)."""
    from tests.test_flops import counted_step, image_batch, staged_model

    module = {"type": "mixture_of_depths", "schedule": "fixed", "ratio": ratio}
    model = staged_model(tokenizer, stage, modules=[module])
    batch = image_batch(model, tokenizer)
    flops = StepFlops.for_model(model)
    images = batch.pixel_values.shape[0]
    estimated = flops.for_batch(batch) + flops.vision(images)
    assert estimated == counted_step(model, batch)["total"]
    dense = flops.lm(batch.num_tokens, batch.input_ids.shape[1], batch.num_supervised_tokens)
    assert flops.for_batch(batch) < dense  # the MoD layer ran fewer tokens than the batch holds


# ----------------------------------------------------------------------------- ZeRO-3


@pytest.mark.slow
def test_two_rank_zero3_steps_with_a_text_only_rank(demo_data, tmp_path):
    """Rank 1 never sees an image: its routers still run (nothing to select), so ZeRO-3's gathers and
    reduce-scatters match rank 0's and the steps finish; each rank writes its own result file."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO, tiny_recipe_dict
    from tests.test_zero3_text_only import image_or_text_shards

    recipe = tiny_recipe_dict(demo_data, tmp_path / "out", max_steps=2, micro_batch_size=2, zero_stage=3, log_every=1)
    recipe["data"].update(train=image_or_text_shards(tmp_path / "data"), eval=[], shuffle=False)
    recipe["modules"] = [{"type": "mixture_of_depths", "schedule": "fixed", "ratio": 0.5}]
    path = tmp_path / "mod_zero3.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "tests" / "pair_runner.py"), str(tmp_path), str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)  # a hang fails here
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"mod_zero3.rank{rank}.json").read_text())
        assert result["step"] == 2 and result["finite"], (rank, result)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("objective/mod/retention/layer1") == 0.5 for row in rows), rows[-1]


def test_eval_greedy_decode_matches_generate(tokenizer):
    """The evaluation's own KV-cached loop (a fresh forward context per step) decodes as generate does."""
    from llava_train.evaluate.decode import greedy_decode

    mod = with_mod(dense_model(tokenizer, attn="sdpa", layers=4), randomise=0.5, schedule="fixed", ratio=0.5)
    rows = [example(mod, 1, 4, 0), example(mod, 2, 6, 1)]
    right = collate(rows, tokenizer.pad_token_id, mod.image_token_id)
    tokens = greedy_decode(mod, right, max_new_tokens=4, stop_ids=[], pad_id=tokenizer.pad_token_id)
    batch = left_padded(right)
    prompt = mod.forward_context(batch)
    with torch.no_grad():
        with context.activate(prompt):
            embeds = mod.embed(batch)
        with context.during_generation(mod.decoder, prompt):
            out = mod.lm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, max_new_tokens=4,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    assert tokens == out[:, -4:].tolist()
