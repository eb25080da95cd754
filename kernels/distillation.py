"""Forward KL from a teacher's distribution to the student's LM head, chunked over rows.

The first non-cross-entropy user of `chunked.py`'s per-chunk hook: the teacher's logits for a
block of rows come from a callable, so they need not exist for all rows at once either (compute
them from the teacher's hidden states and head per chunk, or slice a precomputed tensor).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kernels.chunked import ChunkResult, run_scalar_loss
from kernels.linear_cross_entropy import DEFAULT_CHUNK_SIZE


def chunked_kl_divergence(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Callable[[slice], Tensor],
    *,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Sum over rows of KL(softmax(teacher) || softmax(hidden @ weight.T + bias)).

    `teacher_logits(rows)` returns the teacher's `[rows, V]` logits for that slice of rows (no
    gradient flows into it). Divide by the row count for a mean.
    """

    def chunk_fn(logits: Tensor, rows: slice) -> ChunkResult:
        with torch.no_grad():
            teacher_logp = torch.log_softmax(teacher_logits(rows).float(), dim=1)
        student_logp = torch.log_softmax(logits, dim=1)
        teacher_p = teacher_logp.exp()
        kl = (teacher_p * (teacher_logp - student_logp)).sum()
        # d KL / d student logits = softmax(student) - softmax(teacher)
        return ChunkResult(value=kl, grad_logits=student_logp.exp_().sub_(teacher_p))

    loss, _ = run_scalar_loss(hidden, weight, bias, chunk_fn, chunk_size=chunk_size)
    return loss
