"""Per-sequence sums of label log-probs (what DPO-style objectives compare), chunked over rows.

Unlike cross-entropy, the output is a vector `[B]` whose upstream gradients differ per sequence
(chosen vs rejected), so the head's gradients cannot be built in the forward. The forward keeps
only values; the backward recomputes each chunk's logits and weighs its rows by their sequence's
upstream gradient: one extra `[chunk, D] x [D, V]` matmul per chunk, still no `[N, V]` logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.chunked import ChunkResult, Needs, chunked_linear, compute_dtype_for
from kernels.linear_cross_entropy import DEFAULT_CHUNK_SIZE


def _log_softmax_at_targets(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(log p[target] per row, softmax), the softmax written over `logits` (one [rows, V] buffer)."""
    rows = torch.arange(targets.shape[0], device=logits.device)
    logits -= logits.amax(dim=1, keepdim=True)  # shifted, so exp cannot overflow
    target_logit = logits[rows, targets]
    probs = logits.exp_()
    sum_exp = probs.sum(dim=1)
    probs /= sum_exp[:, None]
    return target_logit - sum_exp.log(), probs


class _SequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seq_ids, num_seqs, chunk_size, compute_dtype):
        def values(logits: Tensor, rows: slice) -> ChunkResult:
            target_logp, _ = _log_softmax_at_targets(logits, targets[rows])
            return ChunkResult(value=logits.new_zeros(num_seqs).index_add_(0, seq_ids[rows], target_logp))

        kwargs = dict(chunk_size=chunk_size, compute_dtype=compute_dtype, needs=Needs(False, False, False))
        out, _, _ = chunked_linear(hidden, weight, bias, values, **kwargs)
        ctx.save_for_backward(hidden, weight, bias, targets, seq_ids)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, seq_ids = ctx.saved_tensors
        row_grad = grad_out.float()[seq_ids]

        def grads(logits: Tensor, rows: slice) -> ChunkResult:
            # d log p[t] / d logits = onehot(t) - softmax, weighted by the row's upstream gradient
            _, probs = _log_softmax_at_targets(logits, targets[rows])
            g = row_grad[rows]
            grad = probs.mul_(-g[:, None])
            grad[torch.arange(grad.shape[0], device=grad.device), targets[rows]] += g
            return ChunkResult(value=logits.new_zeros(()), grad_logits=grad)

        needs = Needs(*ctx.needs_input_grad[:2], bias is not None and ctx.needs_input_grad[2])
        kwargs = dict(chunk_size=ctx.chunk_size, compute_dtype=ctx.compute_dtype, needs=needs)
        _, _, g = chunked_linear(hidden, weight, bias, grads, **kwargs)
        return g.hidden, g.weight, g.bias, None, None, None, None, None


def sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
) -> Tensor:
    """Sum over t of log softmax(hidden[b, t] @ weight.T + bias)[labels[b, t]], per sequence -> [B] fp32.

    `labels` are aligned with `hidden` (the caller shifts: labels[b, t] is the token after
    position t); positions labelled `ignore_index` are skipped before any matmul. A sequence is a
    row, unless `sequence_ids` (shaped like `labels`) says which of `num_sequences` each position
    belongs to (several per row when packed): then the result is `[num_sequences]`.
    """
    batch = hidden.shape[0] if sequence_ids is None else num_sequences
    keep = labels != ignore_index
    if sequence_ids is None:
        sequence_ids = torch.arange(batch, device=labels.device)[:, None].expand_as(labels)
    seq_ids = sequence_ids[keep]
    rows = hidden[keep]  # [kept, D]; autograd scatters grad_hidden back to [B, T, D]
    dtype = compute_dtype_for(hidden, weight)
    return _SequenceLogprobs.apply(rows, weight, bias, labels[keep], seq_ids, batch, chunk_size, dtype)
