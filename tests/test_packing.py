"""Packing: several samples per row give exactly the per-sample losses and gradients of unpacked samples."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from llava_train.data.batch import IGNORE_INDEX, Example, TokenRole
from llava_train.data.collate import collate, collate_rows
from llava_train.model.build import build_model, load_tokenizer
from llava_train.model.packed_attention import block_causal_mask, varlen_boundaries
from llava_train.objectives.lm import supervised_positions
from llava_train.recipe import ModelConfig
from tests.conftest import TINY_LM, TINY_VISION

VARLEN = "llava_train_varlen_reference"


def varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What a flash varlen kernel computes from cu_seq_lens: causal attention inside each block of the
    flattened batch. Lets the CPU check the boundaries we hand to flash-attn."""
    assert attention_mask is None
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    flat = [t.transpose(1, 2).reshape(batch * length, -1, dim) for t in (query, key, value)]
    q, k, v = flat[0], flat[1].repeat_interleave(groups, 1), flat[2].repeat_interleave(groups, 1)
    rows = list(range(0, batch * length + 1, length))  # without boundaries: causal over each row
    bounds = kwargs["cu_seq_lens_q"].tolist() if "cu_seq_lens_q" in kwargs else rows
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        block = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        out[start:end] = F.scaled_dot_product_attention(*block, is_causal=True, scale=scaling).transpose(0, 1)
    return out.reshape(batch, length, heads, dim), None


AttentionInterface.register(VARLEN, varlen_reference_attention)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def make_model(tokenizer, attn: str):
    cfg = ModelConfig(
        vision={"config": dict(TINY_VISION)}, lm={"config": dict(TINY_LM)}, tokenizer="unused",
        attn_implementation="sdpa" if attn == VARLEN else attn,
    )
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    if attn == VARLEN:
        model.lm.config._attn_implementation = VARLEN
    return model.float().train()


def make_examples(model, tokenizer) -> list[Example]:
    """Image and text-only samples of different lengths; one text sample is supervised from its first token,
    the case where a packed row would otherwise learn sample B's first token from sample A's last."""
    torch.manual_seed(1)
    image = [model.image_token_id] * model.tokens_per_image

    def text(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    def sample(key, prompt, answer, images=0):
        ids = image * images + text(prompt) + text(answer)
        labels = [IGNORE_INDEX] * (len(ids) - len(text(answer))) + text(answer)
        pixels = [torch.randn(3, 32, 32) for _ in range(images)]
        return Example(ids, labels, images=pixels, key=key)

    everything_supervised = text("every token here is a target")
    return [
        sample("a", "what colour is it?", "a red circle on the left", images=1),
        Example(everything_supervised, list(everything_supervised), key="b"),
        sample("c", "count them", "three", images=2),
        sample("d", "a question without an image, somewhat longer than the rest", "an answer"),
        sample("e", "shape?", "square", images=1),
    ]


def per_sample_losses(model, batch) -> torch.Tensor:
    """Summed next-token loss per sample, at the positions the `lm` objective supervises."""
    hidden = model(batch).hidden_states
    mask, targets = supervised_positions(batch.labels)
    owner = batch.sequence_ids[:, :-1][mask]
    logits = model.output_embeddings(hidden[:, :-1][mask])
    losses = F.cross_entropy(logits, targets, reduction="none")
    return torch.zeros(batch.num_samples).index_add(0, owner, losses)


def grads(model, loss) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    found = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: g for (n, _), g in zip(named, found) if g is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN])
def test_packed_rows_give_the_unpacked_losses_and_gradients(tokenizer, attn):
    model = make_model(tokenizer, attn)
    for p in model.parameters():
        p.requires_grad_(True)  # the tower too: its gradients must not mix samples either
    examples = make_examples(model, tokenizer)
    packed = collate_rows([examples[:3], examples[3:]], tokenizer.pad_token_id, model.image_token_id)
    assert packed.packed and packed.keys == list("abcde")
    single = [per_sample_losses(model, collate([e], tokenizer.pad_token_id, model.image_token_id)) for e in examples]
    alone = torch.cat(single)
    together = per_sample_losses(model, packed)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)

    reference = grads(model, alone.sum())
    got = grads(model, together.sum())
    assert reference.keys() == got.keys() and any(n.startswith("vision.") for n in got)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    # One sample's loss in the pack depends on nothing else in its row (the second sample of row 0).
    one_packed, one_alone = grads(model, together[1]), grads(model, single[1].sum())
    for name in one_alone:
        torch.testing.assert_close(one_packed[name], one_alone[name], rtol=1e-4, atol=1e-6, msg=name)

    # The test can fail: a plain causal mask over the row lets later samples see earlier ones.
    leaky = per_sample_losses(model, dataclasses.replace(packed, packed=False))
    assert not torch.allclose(leaky[1:3], alone[1:3], rtol=1e-3)


def test_collate_rows_lays_out_packed_samples(tokenizer):
    IMG, PAD = 9, 0
    images = [torch.full((3, 4, 4), float(i)) for i in range(2)]
    rows = [
        [Example([5, IMG, 6], [5, IGNORE_INDEX, 6], images=images[:1], key="a"), Example([7, 8], [7, 8], key="b")],
        [Example([IMG, 4], [IGNORE_INDEX, 4], images=images[1:], key="c")],
    ]
    batch = collate_rows(rows, pad_token_id=PAD, image_token_id=IMG)
    assert batch.packed and batch.num_samples == 3 and batch.keys == ["a", "b", "c"]
    assert batch.input_ids.tolist() == [[5, IMG, 6, 7, 8], [IMG, 4, PAD, PAD, PAD]]
    # b's first label is dropped: a's last token must not predict it.
    assert batch.labels.tolist() == [[5, -100, 6, -100, 8], [-100, 4, -100, -100, -100]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 1, 1], [2, 2, -1, -1, -1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    T, I, P = int(TokenRole.TEXT), int(TokenRole.IMAGE), int(TokenRole.PAD)
    assert batch.token_roles.tolist() == [[T, I, T, T, T], [I, T, P, P, P]]
    assert batch.image_sample_index.tolist() == [0, 1] and torch.equal(batch.pixel_values, torch.stack(images))
    assert not collate_rows([[rows[0][0]], [rows[1][0]]], PAD, IMG).packed


def test_block_causal_mask_and_varlen_boundaries():
    ids = torch.tensor([[0, 0, 1, 1, 1], [2, 2, -1, -1, -1]])
    mask = block_causal_mask(ids)[:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert mask[1][2:] == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]  # pads see only pads: no empty row
    cu_seqlens, longest = varlen_boundaries(ids)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 5, 7, 10] and longest == 3
    # a sample id repeated across the row boundary still starts a new block
    assert varlen_boundaries(torch.tensor([[0, 0], [0, 0]]))[0].tolist() == [0, 2, 4]
