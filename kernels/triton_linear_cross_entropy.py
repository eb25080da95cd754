"""Fused linear cross-entropy with a Triton kernel for the per-chunk softmax and gradient.

The split of work (the one Liger-Kernel uses): torch matmuls do the GEMMs -- logits of a row
chunk, then grad_hidden and grad_weight from the gradient of the logits (`chunked.py`) -- and one
Triton program per row does everything between them in a single read-modify-write of that row's
fp32 logits: an online max/sum-of-exp pass (logsumexp, the smoothing mean, the target logit, the
row's loss and z-loss), then a pass that overwrites the logits with
`scale * (softmax * (1 + 2 z lse) - (1 - eps) onehot(target) - eps / V)`. The PyTorch
`cross_entropy_chunk` computes the same thing with several elementwise kernels; it is the
reference the tests hold this one to.

On the CPU this runs only under `TRITON_INTERPRET=1`, which `@triton.jit` reads when this module
is imported (tests set it first). Targets must lie in [0, V): ignored rows were dropped upstream
and the kernel does not bounds-check.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from kernels.chunked import ChunkResult
from kernels.linear_cross_entropy import LossOutput, linear_cross_entropy

INTERPRETED = bool(triton.knobs.runtime.interpret)  # how @triton.jit below was built


@triton.jit
def _cross_entropy_rows(
    logits_ptr,
    row_stride,
    targets_ptr,
    loss_ptr,
    z_ptr,
    vocab,
    label_smoothing,
    z_loss,
    scale,
    BLOCK: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)

    # Pass 1: running max m and sum of exp(x - m), rescaled whenever m grows (online logsumexp).
    m = float("-inf")
    sum_exp = 0.0
    sum_logits = 0.0
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf"))
        new_m = tl.maximum(m, tl.max(x, axis=0))
        sum_exp = sum_exp * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
        if SMOOTH:
            sum_logits += tl.sum(tl.where(offs < vocab, x, 0.0), axis=0)
    lse = m + tl.log(sum_exp)

    target_logit = tl.load(row_ptr + target)
    loss = (1.0 - label_smoothing) * (lse - target_logit)
    if SMOOTH:  # F.cross_entropy's smoothing term: mean over the vocabulary of -log p
        loss += label_smoothing * (lse - sum_logits / vocab)
    z = z_loss * lse * lse
    tl.store(loss_ptr + row, scale * (loss + z))
    tl.store(z_ptr + row, scale * z)

    # Pass 2: overwrite the logits with the gradient of the row's loss.
    softmax_coef = scale * (1.0 + 2.0 * z_loss * lse)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < vocab, other=0.0)
        grad = tl.exp(x - lse) * softmax_coef
        if SMOOTH:
            grad -= scale * label_smoothing / vocab
        grad = tl.where(offs == target, grad - scale * (1.0 - label_smoothing), grad)
        tl.store(row_ptr + offs, grad, mask=offs < vocab)


def triton_cross_entropy_chunk(
    logits: Tensor, targets: Tensor, *, label_smoothing: float, z_loss: float, scale: float
) -> ChunkResult:
    """The Triton `CrossEntropyChunk`: same contract as `cross_entropy_chunk`."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")
    loss = logits.new_empty(rows)
    z = logits.new_empty(rows)
    if rows:
        # One row per program; a block wide enough to stream 128k vocabularies in few steps.
        block = min(triton.next_power_of_2(vocab), 8192)
        _cross_entropy_rows[(rows,)](
            logits, logits.stride(0), targets, loss, z, vocab,
            float(label_smoothing), float(z_loss), float(scale),
            BLOCK=block, SMOOTH=label_smoothing > 0, num_warps=8 if block >= 4096 else 4,
        )  # fmt: skip
    return ChunkResult(value=loss.sum(), grad_logits=logits, stats=z.sum())


def triton_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, **options) -> LossOutput:
    """`linear_cross_entropy` with the Triton per-chunk kernel (CUDA, or the CPU interpreter)."""
    if hidden.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "the Triton loss needs CUDA tensors, or TRITON_INTERPRET=1 set before importing "
            "kernels.triton_linear_cross_entropy (CPU interpreter, for tests)"
        )
    return linear_cross_entropy(hidden, weight, targets, ce_chunk=triton_cross_entropy_chunk, **options)


__all__ = ["triton_cross_entropy_chunk", "triton_linear_cross_entropy", "INTERPRETED"]
