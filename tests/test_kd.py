"""Knowledge distillation (llava_train/objectives/kd/, kernels/distillation.py): the issue's invariants.

The divergences against their plain-autograd reference (values and gradients, chunk sizes that do not
divide N), the JSD endpoints, temperature; RDist's invariances; then the objective on the tiny model:
self-distillation, masking and normalisation, teacher hygiene, refusals, and two-rank ZeRO-3.
"""

from __future__ import annotations

import pytest
import torch

from kernels.distillation import DivergenceSpec, chunked_distillation, naive_distillation

N, D, V = 37, 24, 101
UPSTREAM = 0.37  # a gradient of 1.0 would hide scaling bugs


def inputs(seed=0, n=N, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=gen).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / D**0.5).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).requires_grad_() if bias else None
    teacher = torch.randn(n, V, generator=gen) * 2
    return hidden, weight, b, teacher


def grads(loss, tensors):
    return torch.autograd.grad(loss * UPSTREAM, [t for t in tensors if t is not None])


SPECS = [
    DivergenceSpec("forward_kl"),
    DivergenceSpec("reverse_kl"),
    DivergenceSpec("jsd", beta=0.3),
    DivergenceSpec("jsd", beta=0.9, temperature=2.0, scale_t2=True),
    DivergenceSpec("skew_forward_kl", skew=0.1),
    DivergenceSpec("skew_reverse_kl", skew=0.3, temperature=0.5),
    DivergenceSpec("forward_kl", temperature=3.0, scale_t2=True),
    DivergenceSpec("forward_kl", top_k=7),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-b{s.beta}-T{s.temperature}-k{s.top_k}")
@pytest.mark.parametrize("chunk_size", [5, 16, 1000])
def test_chunked_equals_naive_values_and_gradients(spec, chunk_size):
    hidden, weight, b, teacher = inputs()
    got = chunked_distillation(hidden, weight, lambda rows: teacher[rows], spec, bias=b, chunk_size=chunk_size)
    want = naive_distillation(hidden, weight, teacher, spec, bias=b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads(got, (hidden, weight, b)), grads(want, (hidden, weight, b))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_student_equal_to_teacher_gives_zero_divergence_and_gradient(kind):
    hidden, weight, b, _ = inputs()
    teacher = (hidden @ weight.T + b).detach()
    loss = chunked_distillation(hidden, weight, lambda rows: teacher[rows], DivergenceSpec(kind), bias=b, chunk_size=8)
    assert abs(float(loss.detach())) < 1e-4
    for g in grads(loss, (hidden, weight, b)):
        assert g.abs().max() < 1e-5


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    hidden, weight, b, teacher = inputs()
    run = lambda spec: chunked_distillation(hidden, weight, lambda r: teacher[r], spec, bias=b, chunk_size=8)  # noqa: E731
    assert torch.equal(run(DivergenceSpec("jsd", beta=0.0)), run(DivergenceSpec("forward_kl")))
    assert torch.equal(run(DivergenceSpec("jsd", beta=1.0)), run(DivergenceSpec("reverse_kl")))
    # inside (0, 1) it is a different, smaller, symmetric-ish divergence, not either end
    mid = run(DivergenceSpec("jsd", beta=0.5))
    assert 0 < mid < min(run(DivergenceSpec("forward_kl")), run(DivergenceSpec("reverse_kl")))


def test_temperature_one_is_no_scaling_and_t2_scales_exactly():
    hidden, weight, b, teacher = inputs()
    run = lambda spec: chunked_distillation(hidden, weight, lambda r: teacher[r], spec, bias=b, chunk_size=8)  # noqa: E731
    assert torch.equal(run(DivergenceSpec(temperature=1.0, scale_t2=True)), run(DivergenceSpec()))
    plain, scaled = run(DivergenceSpec(temperature=2.5)), run(DivergenceSpec(temperature=2.5, scale_t2=True))
    torch.testing.assert_close(scaled, plain * 2.5**2)
    for g, w in zip(grads(scaled, (hidden, weight, b)), grads(plain, (hidden, weight, b))):
        torch.testing.assert_close(g, w * 2.5**2)


def test_top_k_with_every_token_is_forward_kl():
    hidden, weight, b, teacher = inputs()
    full = chunked_distillation(hidden, weight, lambda r: teacher[r], DivergenceSpec(), bias=b, chunk_size=8)
    topv = chunked_distillation(hidden, weight, lambda r: teacher[r], DivergenceSpec(top_k=V), bias=b, chunk_size=8)
    torch.testing.assert_close(topv, full)
