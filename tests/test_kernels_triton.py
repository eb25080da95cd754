"""The Triton per-chunk kernel equals the PyTorch reference: compiled on a GPU, interpreted on a CPU.

Triton decides whether `@triton.jit` compiles or interprets when triton (and triton.language, whose
own helpers are jit functions) is first imported, from TRITON_INTERPRET. Setting it inside a pytest
process that may already have imported triton is unreliable, and leaking it would turn later GPU
users into the interpreter; so `test_interpreter_run` re-runs this file in a fresh process with
TRITON_INTERPRET=1, where the cases below run on the CPU. On a CUDA machine they also run compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.linear_cross_entropy import cross_entropy_chunk, linear_cross_entropy  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda" if torch.cuda.is_available() else None
needs_kernel_device = pytest.mark.skipif(DEVICE is None, reason="no CUDA: test_interpreter_run runs these")


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_interpreter_run():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not interpreter_run", __file__]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout


@pytest.fixture
def triton_lce():
    from kernels import triton_linear_cross_entropy as module

    assert module.INTERPRETED == INTERPRETED
    return module


def make_inputs(n=37, d=32, vocab=301, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen) / d**0.5
    bias = torch.randn(vocab, generator=gen) * 0.1
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::4] = -100
    hidden, weight, bias = (t.to(DEVICE).requires_grad_() for t in (hidden, weight, bias))
    return hidden, weight, bias, targets.to(DEVICE)


@needs_kernel_device
@pytest.mark.parametrize(
    "reduction, label_smoothing, z_loss", [("sum", 0.0, 0.0), ("sum", 0.1, 1e-2), ("mean", 0.2, 1e-3)]
)
def test_triton_matches_torch_reference(triton_lce, reduction, label_smoothing, z_loss):
    hidden, weight, bias, targets = make_inputs()
    opts = dict(bias=bias, label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, chunk_size=16)
    got = triton_lce.triton_linear_cross_entropy(hidden, weight, targets, **opts)
    want = linear_cross_entropy(hidden, weight, targets, **opts)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.z_loss_term, want.z_loss_term, rtol=1e-5, atol=1e-6)
    got_grads = torch.autograd.grad(got.loss * 0.37, (hidden, weight, bias))
    want_grads = torch.autograd.grad(want.loss * 0.37, (hidden, weight, bias))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@needs_kernel_device
def test_kernel_streams_a_vocabulary_wider_than_one_block(triton_lce):
    """V = 9000 takes two blocks of 8192, so the online logsumexp must rescale; logits of +-400
    (and 1000) would overflow a plain exp."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9000, generator=gen) * 100
    logits[1, 8500] = 1000.0  # the row's max sits in the second block: the first block's sum must rescale
    logits, targets = logits.to(DEVICE), torch.tensor([5, 8500, 8999], device=DEVICE)
    opts = dict(label_smoothing=0.1, z_loss=1e-4, scale=0.5)
    got = triton_lce.triton_cross_entropy_chunk(logits.clone(), targets, **opts)
    want = cross_entropy_chunk(logits.clone(), targets, **opts)
    torch.testing.assert_close(got.value, want.value, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.stats, want.stats, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.grad_logits, want.grad_logits, rtol=1e-5, atol=1e-6)


@needs_kernel_device
def test_dispatch_reaches_triton(triton_lce, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    original = triton_lce.triton_cross_entropy_chunk
    monkeypatch.setattr(triton_lce, "triton_cross_entropy_chunk", counted)
    hidden, weight, bias, targets = make_inputs(n=9, vocab=50)
    got = kernels.linear_cross_entropy(hidden, weight, targets, bias=bias, z_loss=1e-2, chunk_size=4, backend="triton")
    want = linear_cross_entropy(hidden, weight, targets, bias=bias, z_loss=1e-2)
    assert len(calls) == 2  # 7 kept rows in chunks of 4
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
