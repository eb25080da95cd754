"""Attention inputs for packed rows: each sample attends causally to itself only.

Two ways to say "block-diagonal causal" to a Hugging Face decoder:
- SDPA and eager take a ready 4D mask `[B, 1, T, T]` (transformers returns a 4D mask
  as-is): boolean, True = attend, for SDPA; additive (0 / most negative) for eager.
- Flash-attention (and any other varlen kernel) takes `cu_seq_lens_*`/`max_length_*`
  with no mask; the decoder then flattens the batch to one ragged sequence, so the
  boundaries are over all B*T positions.
Padding is its own block per row (sequence id -1): a pad query then still sees itself,
so no softmax row is empty (an all-masked row gives NaN, whose gradient poisons the
weights even though pad outputs are never read).
"""

from __future__ import annotations

import torch

MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def packed_attention_inputs(sequence_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> dict:
    """Keyword arguments for the decoder's forward (in place of a 2D attention_mask)."""
    if attn_implementation in MASK_IMPLEMENTATIONS:
        allowed = block_causal_mask(sequence_ids)
        if attn_implementation == "sdpa":
            return {"attention_mask": allowed}
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return {"attention_mask": additive.masked_fill(~allowed, torch.finfo(dtype).min)}
    cu_seqlens, max_length = varlen_boundaries(sequence_ids)
    return {
        "attention_mask": None,
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] sequence ids -> [B, 1, T, T] bool: query t sees key s <= t of the same sample."""
    length = sequence_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    return (same & causal)[:, None]


def varlen_boundaries(sequence_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Start offsets of every block in the flattened [B*T] sequence (int32, ending with B*T), and the longest block.

    A block starts at each row start and wherever the sequence id changes."""
    flat = sequence_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: sequence_ids.shape[1]] = True
    offsets = torch.nonzero(starts).flatten()
    ends = torch.tensor([flat.numel()], device=flat.device)
    cu_seqlens = torch.cat([offsets, ends]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())
