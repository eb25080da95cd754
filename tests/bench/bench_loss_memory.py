"""Peak memory and time of the LM-head loss, forward + backward: naive `[N, V]` logits vs chunked.

    python tests/bench/bench_loss_memory.py                       # V=128256, D=1024, fp32 (about 10 min)
    python tests/bench/bench_loss_memory.py --quick               # small shapes, a smoke run

naive   = hidden @ weight.T -> log_softmax (fp32) -> nll_loss(sum), backward
chunked = kernels.linear_cross_entropy(backend="torch", chunk_size=C), backward
triton  = the Triton kernel under TRITON_INTERPRET=1 on a tiny shape: correctness only (the
          interpreter's memory and speed say nothing about a GPU)

Every measurement runs in a fresh process, so no variant inherits another's freed memory. A child
reports its peak RSS (ru_maxrss) above its RSS once the inputs exist ("loss peak"): logits,
their softmax and gradients, and the gradients of hidden and weight. Naive runs that would not fit
this machine are extrapolated linearly in N from the measured ones (the naive peak is a + b*N:
every `[N, V]` buffer grows with N) and marked as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GiB = 2**30


# ----------------------------------------------------------------------------- child: one measurement


def run_child(variant: str, tokens: int, dim: int, vocab: int, chunk: int, dtype_name: str) -> dict:
    import psutil
    import torch
    import torch.nn.functional as F

    import kernels

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    hidden = torch.randn(tokens, dim, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, dim, dtype=dtype).mul_(dim**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    baseline = psutil.Process().memory_info().rss
    start, start_cpu = time.perf_counter(), time.process_time()
    if variant == "naive":
        logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
        loss = F.nll_loss(logp, targets, reduction="sum")
    else:
        loss = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=chunk, backend="torch").loss
    loss.backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_above_inputs": peak - baseline, "seconds": seconds, "cpu_seconds": cpu_seconds}


def run_triton_check() -> dict:
    """Triton (interpreted) vs the torch reference on N=37, D=32, V=301 with ignore/smoothing/z-loss."""
    import torch

    import kernels

    torch.manual_seed(0)
    hidden = torch.randn(37, 32, requires_grad=True)
    weight = (torch.randn(301, 32) / 32**0.5).requires_grad_()
    targets = torch.randint(0, 301, (37,))
    targets[::4] = -100
    opts = dict(label_smoothing=0.1, z_loss=1e-3, chunk_size=16)
    results = {}
    for backend in ("triton", "torch"):
        loss = kernels.linear_cross_entropy(hidden, weight, targets, backend=backend, **opts).loss
        results[backend] = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    diffs = [(a - b).abs().max().item() for a, b in zip(results["triton"], results["torch"])]
    return {"max_abs_diff_loss": diffs[0], "max_abs_diff_grad_hidden": diffs[1], "max_abs_diff_grad_weight": diffs[2]}


# ----------------------------------------------------------------------------- parent: the table


def measure(variant: str, tokens: int, args, chunk: int = 0) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--dim", str(args.dim),
               "--vocab", str(args.vocab), "--chunk", str(chunk), "--dtype", args.dtype]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if variant == "triton":
        env["TRITON_INTERPRET"] = "1"  # read when triton is first imported: a fresh process sets it in time
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a + b*n through the measured (n, bytes) points."""
    n_mean = sum(n for n, _ in points) / len(points)
    y_mean = sum(y for _, y in points) / len(points)
    slope = sum((n - n_mean) * (y - y_mean) for n, y in points) / sum((n - n_mean) ** 2 for n, _ in points)
    return y_mean - slope * n_mean, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="N of the headline comparison")
    parser.add_argument("--naive-tokens", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="N values at which the naive loss is measured (the rest is extrapolated)")  # fmt: skip
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 4096], help="chunked row counts to compare")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="V=32000, D=256, N=2048: a one-minute smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "triton":
        print(json.dumps(run_triton_check()))
        return
    if args.child:
        print(json.dumps(run_child(args.child, args.tokens, args.dim, args.vocab, args.chunk, args.dtype)))
        return
    if args.quick:
        args.vocab, args.dim, args.tokens, args.naive_tokens, args.chunks = 32000, 256, 2048, [512, 1024], [256]
    report(args)


def row(variant: str, tokens: int, peak: float, result: dict | None, note: str) -> None:
    wall, cpu = (f"{result['seconds']:>8.1f}", f"{result['cpu_seconds']:>8.1f}") if result else (f"{'':>8}", f"{'':>8}")
    print(f"| {variant:<18} | {tokens:>5} | {peak / GiB:>13.2f} | {wall} | {cpu} | {note} |")


def report(args) -> None:
    print(f"LM-head loss, forward + backward: V={args.vocab}, D={args.dim}, {args.dtype}, hidden and weight trainable")
    print(f"| {'variant':<18} | {'N':>5} | {'loss peak GiB':>13} | {'wall s':>8} | {'CPU s':>8} | note |")
    print(f"|{'-' * 20}|{'-' * 7}|{'-' * 15}|{'-' * 10}|{'-' * 10}|------|")
    naive = {n: measure("naive", n, args) for n in args.naive_tokens}
    for n, r in naive.items():
        row("naive", n, r["peak_above_inputs"], r, "measured")
    if args.tokens in naive:
        naive_peak = naive[args.tokens]["peak_above_inputs"]
    else:
        a, b = fit_line([(n, r["peak_above_inputs"]) for n, r in naive.items()])
        naive_peak = a + b * args.tokens
        row("naive", args.tokens, naive_peak, None, f"extrapolated: a + b*N fit over N={args.naive_tokens}")
    timed_n = max(args.naive_tokens)  # the largest N where both run: the time comparison
    for chunk in args.chunks:
        for n in sorted({timed_n, args.tokens}):
            r = measure("chunked", n, args, chunk)
            notes = []
            if n == args.tokens:
                notes.append(f"peak 1/{naive_peak / r['peak_above_inputs']:.1f} of naive")
            if n == timed_n:
                base = naive[timed_n]
                notes.append(f"wall {r['seconds'] / base['seconds']:.2f}x, CPU {r['cpu_seconds'] / base['cpu_seconds']:.2f}x naive")
            row(f"chunked C={chunk}", n, r["peak_above_inputs"], r, "; ".join(notes))
    check = measure("triton", 37, args)
    print("triton, interpreted (TRITON_INTERPRET=1), N=37 D=32 V=301, ignore rows, smoothing 0.1, z-loss 1e-3; "
          "max |triton - torch chunked|: " + ", ".join(f"{k.removeprefix('max_abs_diff_')} {v:.1e}" for k, v in check.items()))  # fmt: skip


if __name__ == "__main__":
    main()
