"""Losses on an LM head that never materialise `[tokens, vocab]` logits.

- `linear_cross_entropy(hidden, weight, targets, ..., backend=)`: cross-entropy (+ label smoothing,
  + z-loss) of `hidden @ weight.T + bias`, chunked over rows; backends:
  `torch` (reference, CPU path), `triton` (Triton per-chunk kernel), `liger` (Liger-Kernel, when
  installed; never required), `auto` (triton for CUDA tensors when triton imports, else torch).
- `sequence_logprobs(hidden, weight, labels)`: per-sequence sums of label log-probs (DPO).
- `chunked_distillation(hidden, weight, teacher_logits, DivergenceSpec(...))`: forward/reverse KL,
  generalised JSD, skewed KL, temperature, top-k (distillation; `chunked_kl_divergence` = forward KL).
- `chunked_linear` / `ChunkedLinearLoss` / `ChunkResult`: the shared row-chunked core the losses
  above plug a per-chunk function into; see `kernels/chunked.py`.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from torch import Tensor

# The function below shadows the submodule's attribute name on this package; import the
# submodule's contents with `from kernels.linear_cross_entropy import ...`.
from kernels import linear_cross_entropy as _torch_impl
from kernels.chunked import ChunkedLinearLoss, ChunkFn, ChunkResult, chunked_linear, run_scalar_loss
from kernels.distillation import DivergenceSpec, chunked_distillation, chunked_kl_divergence, naive_distillation
from kernels.linear_cross_entropy import DEFAULT_CHUNK_SIZE, LossOutput, naive_linear_cross_entropy
from kernels.sequence_logprobs import sequence_logprobs

Backend = Literal["auto", "torch", "triton", "liger"]
BACKENDS = ("auto", "torch", "triton", "liger")


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
    backend: Backend = "auto",
) -> LossOutput:
    """Cross-entropy of `hidden [N, D] @ weight[V, D].T (+ bias)` against `targets [N]`; see
    `kernels/linear_cross_entropy.py` for the exact definition (it is backend-independent)."""
    options = dict(
        bias=bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        chunk_size=chunk_size,
        reduction=reduction,
    )
    chosen = resolve_backend(backend, hidden.device)
    if chosen == "triton":
        from kernels.triton_linear_cross_entropy import triton_linear_cross_entropy

        return triton_linear_cross_entropy(hidden, weight, targets, **options)
    if chosen == "liger":
        return _liger_linear_cross_entropy(hidden, weight, targets, **options)
    return _torch_impl.linear_cross_entropy(hidden, weight, targets, **options)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend `backend` means for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _importable("triton") else "torch"
    if backend == "liger" and not _importable("liger_kernel"):
        raise ImportError("backend 'liger' needs `pip install liger-kernel` (and a CUDA GPU)")
    return backend


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _liger_linear_cross_entropy(hidden, weight, targets, *, chunk_size, **options) -> LossOutput:
    """Liger-Kernel's fused loss (it picks its own chunking, so `chunk_size` is unused)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    z_loss = options.pop("z_loss")
    num_tokens = int((targets != options["ignore_index"]).sum())
    out = liger_fused_linear_cross_entropy(
        hidden, weight, targets, lse_square_scale=z_loss, return_z_loss=True, **options
    )
    loss, z_term = out if isinstance(out, tuple) else (out, None)
    z_term = torch.zeros((), device=hidden.device) if z_term is None else z_term.detach()
    return LossOutput(loss=loss, z_loss_term=z_term, num_tokens=num_tokens)


__all__ = [
    "Backend",
    "BACKENDS",
    "ChunkFn",
    "ChunkResult",
    "ChunkedLinearLoss",
    "DivergenceSpec",
    "DEFAULT_CHUNK_SIZE",
    "LossOutput",
    "chunked_distillation",
    "chunked_kl_divergence",
    "chunked_linear",
    "linear_cross_entropy",
    "naive_distillation",
    "naive_linear_cross_entropy",
    "resolve_backend",
    "run_scalar_loss",
    "sequence_logprobs",
]
