"""The chunked LM-head losses equal their naive `[N, V]`-logits definitions, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.linear_cross_entropy import linear_cross_entropy, naive_linear_cross_entropy

N, D, V = 37, 24, 101  # N odd so most chunk sizes leave a ragged last chunk
UPSTREAM = 0.37  # the trainer scales loss_sum before backward; a grad of 1.0 would hide scaling bugs


def make_inputs(n=N, dtype=torch.float32, ignore_every=5, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (n,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, b, targets


def grads_of(loss, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss * UPSTREAM, tensors)


@pytest.mark.parametrize(
    "reduction, label_smoothing, z_loss, bias, chunk_size",
    [
        ("sum", 0.0, 0.0, False, 7),
        ("sum", 0.1, 0.0, True, 16),
        ("sum", 0.0, 1e-2, True, 5),
        ("sum", 0.2, 1e-3, True, 1000),  # one chunk larger than N
        ("mean", 0.0, 0.0, True, 8),
        ("mean", 0.1, 1e-2, False, 3),
    ],
)
def test_matches_naive_fp32(reduction, label_smoothing, z_loss, bias, chunk_size):
    hidden, weight, b, targets = make_inputs(bias=bias)
    opts = dict(bias=b, label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction)
    out = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, **opts)
    ref = naive_linear_cross_entropy(hidden, weight, targets, **opts)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_of(out.loss, (hidden, weight, b)), grads_of(ref, (hidden, weight, b))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert out.num_tokens == int((targets != -100).sum())


def test_naive_reference_is_f_cross_entropy():
    """The reference itself: without z-loss it is exactly F.cross_entropy on full logits."""
    hidden, weight, b, targets = make_inputs()
    logits = hidden @ weight.T + b
    want = F.cross_entropy(logits, targets, label_smoothing=0.1, reduction="sum")
    got = naive_linear_cross_entropy(hidden, weight, targets, bias=b, label_smoothing=0.1)
    torch.testing.assert_close(got, want)


def test_z_loss_term_is_palm_z_loss_and_part_of_the_loss():
    hidden, weight, b, targets = make_inputs()
    keep = targets != -100
    lse = torch.logsumexp(hidden[keep] @ weight.T + b, dim=-1)
    with_z = linear_cross_entropy(hidden, weight, targets, bias=b, z_loss=1e-2)
    without = linear_cross_entropy(hidden, weight, targets, bias=b)
    torch.testing.assert_close(with_z.z_loss_term, 1e-2 * lse.square().sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_z.loss - without.loss, with_z.z_loss_term, rtol=1e-5, atol=1e-5)
    assert not with_z.z_loss_term.requires_grad
    assert without.z_loss_term.item() == 0.0


def test_ignored_rows_get_exactly_zero_gradient():
    hidden, weight, b, targets = make_inputs(ignore_every=3)
    out = linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=4)
    (grad_hidden,) = torch.autograd.grad(out.loss, hidden)
    assert torch.all(grad_hidden[targets == -100] == 0)
    assert torch.all(grad_hidden[targets != -100].abs().sum(-1) > 0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction):
    hidden, weight, b, targets = make_inputs()
    targets[:] = -100
    out = linear_cross_entropy(hidden, weight, targets, bias=b, z_loss=1e-2, reduction=reduction)
    assert out.loss.item() == 0.0 and out.num_tokens == 0
    for grad in torch.autograd.grad(out.loss, (hidden, weight, b)):
        assert torch.count_nonzero(grad) == 0


def test_empty_input():
    hidden, weight, b, targets = make_inputs(n=0)
    out = linear_cross_entropy(hidden, weight, targets, bias=b)
    grad_hidden, grad_weight = torch.autograd.grad(out.loss, (hidden, weight))
    assert out.loss.item() == 0.0 and grad_hidden.shape == (0, D) and torch.count_nonzero(grad_weight) == 0


# bf16: the chunked loss runs its matmuls in bf16 (as `nn.Linear` would) and everything after them in
# fp32. Stated tolerance against the exact fp32 math on the same bf16-rounded inputs: loss within 1e-3
# relative, every gradient within 1.5e-2 of its largest entry (measured: ~1e-4 and ~6e-3; the naive
# bf16 `F.linear -> F.cross_entropy` path shows ~5e-5 and ~4e-3: bf16 keeps 8 mantissa bits).
BF16_LOSS_RTOL, BF16_GRAD_TOL = 1e-3, 1.5e-2


def assert_close_bf16(got: torch.Tensor, want: torch.Tensor):
    error = (got.float() - want.float()).abs().max()
    assert error <= BF16_GRAD_TOL * want.float().abs().max(), f"max error {error} vs scale {want.abs().max()}"


def test_bf16_inputs_within_stated_tolerance():
    hidden, weight, b, targets = make_inputs(dtype=torch.bfloat16)
    exact = [t.detach().float().requires_grad_() for t in (hidden, weight, b)]
    out = linear_cross_entropy(hidden, weight, targets, bias=b, label_smoothing=0.1, z_loss=1e-3, chunk_size=8)
    ref = naive_linear_cross_entropy(*exact[:2], targets, bias=exact[2], label_smoothing=0.1, z_loss=1e-3)
    assert out.loss.dtype == torch.float32  # the loss itself is accumulated in fp32
    torch.testing.assert_close(out.loss, ref, rtol=BF16_LOSS_RTOL, atol=0)
    got = grads_of(out.loss, (hidden, weight, b))
    assert [g.dtype for g in got] == [torch.bfloat16] * 3  # grads come back in each parameter's dtype
    for g, want in zip(got, grads_of(ref, exact)):
        assert_close_bf16(g, want)


def test_autocast_runs_bf16_matmuls_and_returns_fp32_grads():
    """The trainer's CPU bf16 mode: fp32 weights, autocast on; the loss must follow autocast's dtype."""
    hidden, weight, b, targets = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=8)
    ref = naive_linear_cross_entropy(hidden, weight, targets, bias=b)
    fp32 = linear_cross_entropy(hidden, weight, targets, bias=b, chunk_size=8)
    assert out.loss.item() != fp32.loss.item()  # really bf16 matmuls, not silently fp32
    torch.testing.assert_close(out.loss, ref, rtol=BF16_LOSS_RTOL, atol=0)
    got = grads_of(out.loss, (hidden, weight, b))
    assert [g.dtype for g in got] == [torch.float32] * 3
    for g, want in zip(got, grads_of(ref, (hidden, weight, b))):
        assert_close_bf16(g, want)


def test_frozen_head_and_no_grad():
    """Projector pretraining freezes the head: only grad_hidden is built; evaluation builds none."""
    hidden, weight, _, targets = make_inputs()
    weight.requires_grad_(False)
    out = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    out.loss.backward()
    assert weight.grad is None
    (want,) = torch.autograd.grad(naive_linear_cross_entropy(hidden, weight, targets), hidden)
    torch.testing.assert_close(hidden.grad, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        evaluated = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    torch.testing.assert_close(evaluated.loss, out.loss.detach())


def test_second_backward_is_refused():
    hidden, weight, b, targets = make_inputs()
    out = linear_cross_entropy(hidden, weight, targets, bias=b)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        out.loss.backward()


def test_rejects_bad_options():
    hidden, weight, b, targets = make_inputs()
    for bad in (dict(reduction="none"), dict(label_smoothing=1.5), dict(z_loss=-1.0), dict(chunk_size=0)):
        with pytest.raises(ValueError):
            linear_cross_entropy(hidden, weight, targets, **bad)


# ----------------------------------------------------------------------------- sequence_logprobs


def naive_sequence_logprobs(hidden, weight, labels, bias=None):
    logp = F.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1)
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(dim=1)


def test_sequence_logprobs_matches_naive():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 9, D, generator=gen, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, requires_grad=True)
    bias = torch.randn(V, generator=gen, requires_grad=True)
    labels = torch.randint(0, V, (4, 9), generator=gen)
    labels[:, :3] = -100  # a prompt
    labels[2] = -100  # a sequence with nothing supervised
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0])  # DPO weighs chosen and rejected differently
    got = kernels.sequence_logprobs(hidden, weight, labels, bias=bias, chunk_size=5)
    want = naive_sequence_logprobs(hidden, weight, labels, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[2].item() == 0.0
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias))
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight, bias))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got_grads[0][labels == -100]) == 0


def test_chunked_kl_divergence_matches_naive():
    hidden, weight, b, _ = make_inputs()
    teacher = torch.randn(N, V, generator=torch.Generator().manual_seed(2)) * 2
    got = kernels.chunked_kl_divergence(hidden, weight, lambda rows: teacher[rows], bias=b, chunk_size=6)
    student_logp = F.log_softmax(hidden @ weight.T + b, dim=-1)
    want = F.kl_div(student_logp, F.log_softmax(teacher, dim=-1), log_target=True, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads_of(got, (hidden, weight, b)), grads_of(want, (hidden, weight, b))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- dispatch and the objective


def test_backend_resolution():
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown loss backend"):
        kernels.resolve_backend("cuda-magic", torch.device("cpu"))
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="liger-kernel"):
            kernels.resolve_backend("liger", torch.device("cpu"))


def test_lm_objective_uses_recipe_loss_options():
    """The objective's loss_sum is the naive CE (+ z-loss) over supervised next tokens only."""
    from types import SimpleNamespace

    from llava_train.model.mllm import ModelOutput
    from llava_train.objectives import OBJECTIVES
    from llava_train.recipe import LossConfig

    class Stub(torch.nn.Module):  # just enough of MultimodalLM: hidden states and a head
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(D, V)

        @property
        def output_embeddings(self):
            return self.head

        def forward(self, batch):
            return ModelOutput(batch.hidden)

    class FakeBatch:
        hidden = torch.randn(2, 6, D)
        labels = torch.tensor([[-100, -100, 5, 7, 9, -100], [-100, 3, 4, -100, -100, -100]])

    model, batch = Stub(), FakeBatch()
    loss = LossConfig(chunk_size=2, label_smoothing=0.1, z_loss=1e-2, backend="torch")
    build = SimpleNamespace(recipe=SimpleNamespace(stage=SimpleNamespace(loss=loss)))
    objective = OBJECTIVES["lm"](OBJECTIVES["lm"].Options(), build)
    out = objective(model, batch)
    mask = batch.labels[:, 1:] != -100
    picked, targets = batch.hidden[:, :-1][mask], batch.labels[:, 1:][mask]
    head = model.head
    want = naive_linear_cross_entropy(picked, head.weight, targets, bias=head.bias, label_smoothing=0.1, z_loss=1e-2)
    torch.testing.assert_close(out.loss_sum, want, rtol=1e-5, atol=1e-5)
    assert out.count == 5 and out.metrics["z_loss_sum"] > 0
