"""Divergences between a teacher's and a student's next-token distributions, chunked over rows.

The student's logits are `hidden @ weight.T + bias`; the teacher's logits for a block of rows come
from a callable (compute them from the teacher's hidden states and head per chunk, or slice a
precomputed tensor), so neither model's `[tokens, vocab]` logits exist at once: one `[chunk, V]`
block of each at a time (`chunked.py` builds the head's gradients chunk by chunk).

With p = softmax(teacher / T) and q = softmax(student / T) per row:
- `forward_kl`        KL(p || q)                                  (LLaVA-KD's default, "mode covering")
- `reverse_kl`        KL(q || p)                                  ("mode seeking", MiniLLM)
- `jsd`               beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
                      (GKD's generalised JSD; beta = 0 is exactly forward KL, beta = 1 reverse KL, as TRL)
- `skew_forward_kl`   KL(p || a p + (1 - a) q)                    (DistiLLM's skewed KL, a = `skew`)
- `skew_reverse_kl`   KL(q || a q + (1 - a) p)
Each value is the divergence itself (0 when student == teacher), not torchtune's cross-entropy form.
`scale_t2` multiplies by T^2 (Hinton's gradient-scale correction); `top_k` keeps the teacher's k most
likely tokens, renormalised (forward KL only: the other divergences need the teacher's whole tail).

Gradients are analytic: with h = dJ/dq, dJ/dz = q * (h - <q, h>) (the softmax Jacobian), and
dJ/dstudent = dJ/dz / T. `naive_distillation` is the plain-autograd reference the tests compare to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from kernels.chunked import ChunkResult, run_scalar_loss
from kernels.linear_cross_entropy import DEFAULT_CHUNK_SIZE

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


@dataclass(frozen=True)
class DivergenceSpec:
    kind: Divergence = "forward_kl"
    beta: float = 0.5  # jsd: the teacher's weight in the mixture
    skew: float = 0.1  # skew_*: the mixing weight a
    temperature: float = 1.0
    scale_t2: bool = False  # multiply by T^2
    top_k: int | None = None  # forward_kl only: the teacher's k most likely tokens

    def __post_init__(self):
        if self.kind not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.kind!r}; choose one of {', '.join(DIVERGENCES)}")
        if not 0 <= self.beta <= 1 or not 0 <= self.skew < 1 or self.temperature <= 0:
            raise ValueError("need 0 <= beta <= 1, 0 <= skew < 1 and temperature > 0")
        if self.top_k is not None and self.kind != "forward_kl":
            raise ValueError(f"top_k needs divergence forward_kl ({self.kind} needs the teacher's whole distribution)")

    @property
    def resolved(self) -> str:
        """jsd at its ends is exactly forward or reverse KL (TRL's convention)."""
        if self.kind == "jsd" and self.beta in (0.0, 1.0):
            return "forward_kl" if self.beta == 0.0 else "reverse_kl"
        return self.kind


# ----------------------------------------------------------------------------- per-row math


def divergence_rows(student: Tensor, teacher: Tensor, spec: DivergenceSpec) -> tuple[Tensor, Tensor]:
    """(divergence per row [rows], its gradient w.r.t. the student's logits [rows, V]), fp32.

    `student` may be overwritten. Analytic gradients: no autograd graph of size V is kept.
    """
    t = spec.temperature
    logq = torch.log_softmax(student.div_(t), dim=-1)
    q = logq.exp()
    teacher = teacher.float() / t
    if spec.top_k is not None:
        value, grad = _top_k_forward_kl(logq, q, teacher, spec.top_k)
    else:
        logp = torch.log_softmax(teacher, dim=-1)
        value, grad = _FUNCTIONS[spec.resolved](logq, q, logp, spec)
    scale = t * t if spec.scale_t2 else 1.0
    return value * scale, grad.mul_(scale / t)


def _forward_kl(logq, q, logp, spec):
    p = logp.exp()
    return (p * (logp - logq)).sum(-1), q - p


def _reverse_kl(logq, q, logp, spec):
    value = (q * (logq - logp)).sum(-1)
    return value, q * (logq - logp - value[:, None])


def _jsd(logq, q, logp, spec):
    b = spec.beta
    logm = _log_mix(logp, b, logq)
    p = logp.exp()
    value = b * (p * (logp - logm)).sum(-1) + (1 - b) * (q * (logq - logm)).sum(-1)
    return value, _through_softmax(q, (1 - b) * (logq - logm))


def _skew_forward_kl(logq, q, logp, spec):
    a = spec.skew
    logm = _log_mix(logp, a, logq)
    p = logp.exp()
    value = (p * (logp - logm)).sum(-1)
    return value, _through_softmax(q, -(1 - a) * (logp - logm).exp())


def _skew_reverse_kl(logq, q, logp, spec):
    a = spec.skew
    logm = _log_mix(logq, a, logp)
    value = (q * (logq - logm)).sum(-1)
    return value, _through_softmax(q, logq - logm + 1 - a * (logq - logm).exp())


_FUNCTIONS = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
}


def _log_mix(log_a: Tensor, weight: float, log_b: Tensor) -> Tensor:
    """log(weight * a + (1 - weight) * b), stable; weight in [0, 1)."""
    if weight == 0:
        return log_b
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _through_softmax(q: Tensor, h: Tensor) -> Tensor:
    """dJ/dz from h = dJ/dq: the softmax Jacobian, q * (h - <q, h>)."""
    return q * (h - (q * h).sum(-1, keepdim=True))


def _top_k_forward_kl(logq, q, teacher, k):
    values, index = teacher.topk(min(k, teacher.shape[-1]), dim=-1)
    logp = torch.log_softmax(values, dim=-1)  # renormalised over the k tokens
    p = logp.exp()
    value = (p * (logp - logq.gather(-1, index))).sum(-1)
    return value, q.scatter_add(-1, index, -p)


# ----------------------------------------------------------------------------- chunked over rows


def chunked_distillation(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Callable[[slice], Tensor],
    spec: DivergenceSpec = DivergenceSpec(),
    *,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Sum over rows of the divergence between `teacher_logits(rows)` and `hidden @ weight.T + bias`.

    `teacher_logits(rows)` returns the teacher's `[rows, V]` logits for that slice of `hidden`'s rows
    (called under no_grad). Differentiable w.r.t. hidden, weight and bias.
    """

    def chunk_fn(logits: Tensor, rows: slice) -> ChunkResult:
        with torch.no_grad():
            teacher = teacher_logits(rows)
        value, grad = divergence_rows(logits, teacher, spec)
        return ChunkResult(value=value.sum(), grad_logits=grad)

    loss, _ = run_scalar_loss(hidden, weight, bias, chunk_fn, chunk_size=chunk_size)
    return loss


def chunked_kl_divergence(hidden, weight, teacher_logits, *, bias=None, chunk_size=DEFAULT_CHUNK_SIZE) -> Tensor:
    """Sum over rows of KL(softmax(teacher) || softmax(hidden @ weight.T + bias))."""
    return chunked_distillation(hidden, weight, teacher_logits, DivergenceSpec(), bias=bias, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- the reference


def naive_divergence(student: Tensor, teacher: Tensor, spec: DivergenceSpec) -> Tensor:
    """Per-row divergence from full logits with plain torch ops (autograd gives its gradient)."""
    t = spec.temperature
    logq = torch.log_softmax(student.float() / t, dim=-1)
    teacher = teacher.float() / t
    kind = spec.resolved
    if spec.top_k is not None:
        values, index = teacher.topk(spec.top_k, dim=-1)
        logp = torch.log_softmax(values, dim=-1)
        value = (logp.exp() * (logp - logq.gather(-1, index))).sum(-1)
    else:
        logp = torch.log_softmax(teacher, dim=-1)
        p, q = logp.exp(), logq.exp()
        kl = lambda a, log_a, log_b: (a * (log_a - log_b)).sum(-1)  # noqa: E731
        if kind == "forward_kl":
            value = kl(p, logp, logq)
        elif kind == "reverse_kl":
            value = kl(q, logq, logp)
        elif kind == "jsd":
            m = (spec.beta * p + (1 - spec.beta) * q).log()
            value = spec.beta * kl(p, logp, m) + (1 - spec.beta) * kl(q, logq, m)
        elif kind == "skew_forward_kl":
            value = kl(p, logp, (spec.skew * p + (1 - spec.skew) * q).log())
        else:
            value = kl(q, logq, (spec.skew * q + (1 - spec.skew) * p).log())
    return value * (t * t if spec.scale_t2 else 1.0)


def naive_distillation(hidden, weight, teacher_logits: Tensor, spec: DivergenceSpec = DivergenceSpec(), *, bias=None):
    """`chunked_distillation` with full `[N, V]` logits of both models (tests and benchmarks)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return naive_divergence(logits, teacher_logits, spec).sum()
