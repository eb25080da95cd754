"""Cross-entropy of an LM head without `[N, V]` logits: the PyTorch reference and the CPU path.

`linear_cross_entropy(hidden, weight, targets)` equals
`F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=..., label_smoothing=...)` plus an
optional PaLM-style z-loss, `z_loss * logsumexp(logits)**2` per token, with the same gradients; the
logits exist one `[chunk_size, V]` fp32 block at a time (`chunked.py`) and their softmax and
gradient are computed in place in that block. `triton_linear_cross_entropy.py` swaps in a Triton
kernel for the per-chunk step (`ce_chunk`); everything else is shared.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from kernels.chunked import ChunkResult, run_scalar_loss

DEFAULT_CHUNK_SIZE = 1024  # rows; at V=128k one fp32 logits block is 512 MiB


class LossOutput(NamedTuple):
    loss: Tensor  # cross-entropy (+ z-loss) with the requested reduction; differentiable
    z_loss_term: Tensor  # the z-loss part of `loss`, detached, for logging (0 when z_loss == 0)
    num_tokens: int  # rows whose target is not ignore_index


class CrossEntropyChunk(Protocol):
    """Loss of one block of fp32 logits and its gradient, written over `logits`.

    Returns ChunkResult(value=scale * sum over rows of (CE + z-loss), grad_logits=scale * d/dlogits,
    stats=scale * sum of the z-loss part).
    """

    def __call__(
        self, logits: Tensor, targets: Tensor, *, label_smoothing: float, z_loss: float, scale: float
    ) -> ChunkResult: ...


def cross_entropy_chunk(
    logits: Tensor, targets: Tensor, *, label_smoothing: float, z_loss: float, scale: float
) -> ChunkResult:
    """The PyTorch `CrossEntropyChunk`: one `[rows, V]` buffer, reused for softmax and gradient."""
    eps, vocab = label_smoothing, logits.shape[1]
    rows = torch.arange(targets.shape[0], device=logits.device)
    row_max = logits.amax(dim=1)
    logits -= row_max[:, None]  # shifted, so exp cannot overflow
    target_logit = logits[rows, targets]
    mean_logit = logits.mean(dim=1) if eps else None
    probs = logits.exp_()
    sum_exp = probs.sum(dim=1)
    probs /= sum_exp[:, None]
    lse_shifted = sum_exp.log()
    lse = lse_shifted + row_max
    # F.cross_entropy's smoothing: (1 - eps) * nll + eps * mean over the vocabulary of -log p
    loss = (1 - eps) * (lse_shifted - target_logit)
    if eps:
        loss += eps * (lse_shifted - mean_logit)
    z_term = z_loss * lse.square()
    # d/dlogits: softmax * (1 + 2 z lse) - (1 - eps) * onehot(target) - eps / V
    grad = probs
    grad *= (scale * (1 + 2 * z_loss * lse))[:, None]
    grad[rows, targets] -= (1 - eps) * scale
    if eps:
        grad -= eps * scale / vocab
    return ChunkResult(value=(loss + z_term).sum() * scale, grad_logits=grad, stats=z_term.sum() * scale)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: Literal["sum", "mean"] = "sum",
    ce_chunk: CrossEntropyChunk = cross_entropy_chunk,
) -> LossOutput:
    """Cross-entropy of `hidden [N, D] @ weight[V, D].T (+ bias[V])` against `targets [N]`.

    Rows whose target is `ignore_index` are dropped before any matmul. `reduction="mean"` divides
    by the kept rows (like F.cross_entropy) but gives 0, not nan, when every row is ignored.
    Matmuls run in the inputs' dtype (autocast's under autocast); softmax, loss and gradient in fp32.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    keep = targets != ignore_index
    num_tokens = int(keep.sum())
    if num_tokens != targets.numel():
        hidden, targets = hidden[keep], targets[keep]  # autograd scatters grad_hidden back
    scale = 1.0 / max(num_tokens, 1) if reduction == "mean" else 1.0

    def chunk_fn(logits: Tensor, rows: slice) -> ChunkResult:
        return ce_chunk(logits, targets[rows], label_smoothing=label_smoothing, z_loss=z_loss, scale=scale)

    loss, z_term = run_scalar_loss(hidden, weight, bias, chunk_fn, chunk_size=chunk_size)
    return LossOutput(loss=loss, z_loss_term=z_term.detach(), num_tokens=num_tokens)


def naive_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """The definition the chunked loss must match: full fp32 `[N, V]` logits, then F.cross_entropy."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    loss = torch.nn.functional.cross_entropy(
        logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )
    keep = targets != ignore_index
    z = z_loss * torch.logsumexp(logits[keep], dim=-1).square().sum()
    return loss + (z / keep.sum() if reduction == "mean" else z)


__all__ = [
    "LossOutput",
    "CrossEntropyChunk",
    "cross_entropy_chunk",
    "linear_cross_entropy",
    "naive_linear_cross_entropy",
]
