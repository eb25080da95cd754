"""Losses of an LM head, `logits = hidden @ weight.T + bias`, computed chunk by chunk over rows.

Every loss on top of an LM head has the same shape: logits for a block of rows, some function of
those logits, and that function's gradient w.r.t. the logits, which two matmuls turn into the
gradients of hidden, weight and bias. `chunked_linear` runs that loop, so at most one
`[chunk_size, V]` block of fp32 logits is alive at a time, never `[N, V]`. A loss supplies only
its per-chunk function (`ChunkFn`): cross-entropy (`linear_cross_entropy.py`, and its Triton twin),
per-sequence log-probs (`sequence_logprobs.py`) and distillation plug in here.

Distillation is a `ChunkFn` too (`distillation.py` implements forward KL): the closure computes
the teacher's fp32 logits for `rows` under `no_grad` and returns `ChunkResult(value=KL(p_t || p_s)
over the rows, grad_logits=softmax(student) - softmax(teacher))`; JSD or a temperature changes
only that function. `ChunkedLinearLoss` does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor


class ChunkResult(NamedTuple):
    value: Tensor  # this chunk's contribution to the total (any fixed shape; summed over chunks)
    grad_logits: Tensor | None = None  # d value / d logits, fp32 [rows, V]; None when only values are wanted
    stats: Tensor | None = None  # side quantities to sum over chunks (e.g. the z-loss part), never differentiated


# (fp32 logits of these rows [rows, V] -- the function may overwrite them in place, the rows) -> ChunkResult
ChunkFn = Callable[[Tensor, slice], ChunkResult]


@dataclass
class HeadGrads:
    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


@dataclass(frozen=True)
class Needs:
    """Which gradients to build: a frozen head (projector pretraining) skips its `[V, D]` matmul."""

    hidden: bool = True
    weight: bool = True
    bias: bool = True

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


def compute_dtype_for(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (what `nn.Linear` would use), else the wider input's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def chunked_linear(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunk_fn: ChunkFn,
    *,
    chunk_size: int,
    compute_dtype: torch.dtype,
    needs: Needs = Needs(),
) -> tuple[Tensor, Tensor | None, HeadGrads]:
    """Sum `chunk_fn` over row chunks of `hidden [N, D]`; with its `grad_logits`, also the head's grads.

    Matmuls run in `compute_dtype` (bf16 stays fast); logits are upcast to fp32 before `chunk_fn`.
    Weight and bias grads accumulate in fp32 and come back in their parameter's dtype.
    Returns (summed value, summed stats or None, grads).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, explicitly
        return _run(hidden, weight, bias, chunk_fn, chunk_size, compute_dtype, needs)


def _run(hidden, weight, bias, chunk_fn, chunk_size, compute_dtype, needs):
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(torch.float32)
    grads = HeadGrads(
        hidden=torch.empty_like(hidden) if needs.hidden else None,
        weight=_fp32_zeros(weight) if needs.weight else None,
        bias=_fp32_zeros(bias) if needs.bias and bias is not None else None,
    )
    value = stats = None
    # At least one (possibly empty) chunk, so the value has its shape and dtype even with no rows.
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        result = _chunk(hidden, w, b, chunk_fn, slice(start, start + chunk_size), grads, needs)
        value = result.value if value is None else value + result.value
        if result.stats is not None:
            stats = result.stats if stats is None else stats + result.stats
    grads.weight = None if grads.weight is None else grads.weight.to(weight.dtype)
    grads.bias = None if grads.bias is None else grads.bias.to(bias.dtype)
    return value, stats, grads


def _fp32_zeros(like: Tensor) -> Tensor:
    return torch.zeros(like.shape, dtype=torch.float32, device=like.device)


def _chunk(hidden, w, b, chunk_fn, rows, grads, needs) -> ChunkResult:
    """One chunk; a function of its own so its `[rows, V]` buffer is freed before the next is made."""
    h = hidden[rows].to(w.dtype)  # w is already in the compute dtype
    logits = (h @ w.T).float()
    if b is not None:
        logits += b
    result = chunk_fn(logits, rows)
    if result.grad_logits is not None and needs.any:
        _accumulate(grads, result.grad_logits, h, w, rows)
    return result._replace(grad_logits=None)


def _accumulate(grads: HeadGrads, grad_logits: Tensor, h: Tensor, w: Tensor, rows: slice) -> None:
    if grads.bias is not None:
        grads.bias += grad_logits.sum(0)
    g = grad_logits.to(w.dtype)
    if grads.hidden is not None:
        grads.hidden[rows] = g @ w
    if grads.weight is not None:
        if h.dtype == grads.weight.dtype:
            grads.weight.addmm_(g.T, h)  # in place: no [V, D] temporary per chunk
        else:
            grads.weight += g.T @ h  # bf16 product, accumulated in fp32


class ChunkedLinearLoss(torch.autograd.Function):
    """A scalar loss whose gradients are built during the forward, chunk by chunk.

    Only `grad_hidden [N, D]` and the fp32 `grad_weight`/`grad_bias` are kept for the backward,
    which scales them by the incoming scalar gradient: no activation of size V survives a chunk,
    and the logits are computed once (not again in the backward).
    Returns (loss, stats); stats (or an empty tensor) carry no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_fn, chunk_size, compute_dtype, needs):
        loss, stats, grads = chunked_linear(
            hidden, weight, bias, chunk_fn, chunk_size=chunk_size, compute_dtype=compute_dtype, needs=needs
        )
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        stats = loss.new_zeros(0) if stats is None else stats
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        # Scaled in place: a second copy of grad_weight ([V, D] fp32) would undo the memory saving.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("ChunkedLinearLoss supports a single backward (its saved grads are scaled in place)")
        ctx.consumed = True
        grads = ctx.saved_tensors
        for grad in grads:
            if grad is not None:
                grad.mul_(grad_loss.to(grad.dtype))
        return *grads, None, None, None, None


def run_scalar_loss(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_fn: ChunkFn, *, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """(loss, stats) of a scalar chunked loss, differentiable w.r.t. hidden, weight and bias."""
    grad_on = torch.is_grad_enabled()
    needs = Needs(
        hidden=grad_on and hidden.requires_grad,
        weight=grad_on and weight.requires_grad,
        bias=grad_on and bias is not None and bias.requires_grad,
    )
    dtype = compute_dtype_for(hidden, weight)
    return ChunkedLinearLoss.apply(hidden, weight, bias, chunk_fn, chunk_size, dtype, needs)
