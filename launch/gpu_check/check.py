"""The GPU check's parts, each in its own process under a time limit, then one table and one JSON.

1. environment: GPU, versions, the carried wheels' requirements met (wheels.py), the measured matmul peak;
2. CUDA-only tests: tests/test_cuda.py and tests/test_kernels_triton.py's compiled cases;
3. benchmark: tests/bench/bench_vs_hf.py, llava_train (ZeRO-2, packing, bf16) vs HF Llava + Trainer.

`--cpu --tiny` runs the same parts on a CPU with tiny shapes (the tests then report their skips), which
tests/test_gpu_check.py does so the script keeps working. run.sh is the entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = ["tests/test_cuda.py", "tests/test_kernels_triton.py"]
# Samples here are ~720 tokens (576 of them the image's), so 6 packed rows of 2048 hold about the HF side's 16.
GPU_BENCH = ["--shape", "qwen2-0.5b", "--steps", "30", "--warmup", "3", "--samples", "768", "--batch", "16",
             "--packed-rows", "6"]
CPU_BENCH = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--samples", "32", "--batch", "8",
             "--packed-rows", "3"]
COMMON_BENCH = ["--rounds", "1", "--packing", "--precision", "bf16", "--zero-stage", "2"]


def run_part(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run `cmd` in its own process group with output to `log`; on timeout kill the whole group."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this Popen started, children included
            proc.wait()
            code = None
    return {"exit_code": code, "timed_out": code is None, "seconds": round(time.perf_counter() - start, 1)}


def environment(on_gpu: bool) -> dict:
    """`llava-train env`'s facts and warnings, the carried wheels' check, and the bf16 matmul peak."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import wheels
    from llava_train import env_report
    from llava_train.train.metrics import measure_peak_flops

    facts = env_report.collect()
    # On the CPU the run uses this machine's own packages, not the carried wheels.
    env = {"facts": facts, "warnings": env_report.problems(facts),
           "wheel_problems": wheels.check_installed() if on_gpu else []}
    if on_gpu:
        # The trainer measures at 8192 (peak_matmul_size); 2048 shows how far a smaller product falls short.
        device = f"cuda:{torch.cuda.current_device()}"
        env["bf16_peak_tflops"] = {n: measure_peak_flops(torch.bfloat16, device, n=n) / 1e12 for n in (2048, 8192)}
    return env


def test_counts(junit: Path) -> dict:
    """Passed/failed/skipped from pytest's junit XML, with each skip's reason."""
    if not junit.is_file():
        return {"error": "pytest wrote no report"}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": {}, "failures": []}
    for case in ET.parse(junit).iter("testcase"):
        name = case.get("name")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            counts["skip_reasons"][name] = (outcome.get("message") or "").removeprefix("Skipped: ")
        else:
            counts["failed"] += 1
            counts["failures"].append(name)
    return counts


def bench_table(log: Path) -> list[str]:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    start = next((i for i, line in enumerate(lines) if line.startswith("llava_train vs HF")), len(lines))
    return lines[start:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (CUDA-only tests report skipped)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 2 steps (not Qwen2-0.5B + CLIP-L/336)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything, wheels' install included")
    parser.add_argument("--started", type=float, default=time.time(), help="epoch seconds the run began (run.sh)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    left = lambda: args.budget - (time.time() - args.started)  # noqa: E731
    report: dict = {"mode": "cpu" if args.cpu else "cuda", "tiny": args.tiny}

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA GPU visible: run with --cpu (see launch/gpu_check/run.sh)", file=sys.stderr)
        return 2
    print("== environment", flush=True)
    try:
        report["environment"] = environment(on_gpu=not args.cpu)
    except Exception as exc:  # e.g. a carried package that does not import: the parts below still report
        report["environment"] = {"error": f"{type(exc).__name__}: {exc}", "wheel_problems": []}

    junit = out / "tests.xml"
    pytest = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}",
              "-k", "not interpreter_run", *TESTS]  # the interpreter run is the CPU's way; CI covers it
    limit = min(180, left() - 120)
    print(f"== CUDA-only tests (at most {limit:.0f} s)", flush=True)
    report["tests"] = {**run_part(pytest, out / "tests.log", limit), **test_counts(junit)}

    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_bench"
    bench = [sys.executable, "tests/bench/bench_vs_hf.py", *(CPU_BENCH if args.tiny else GPU_BENCH), *COMMON_BENCH,
             "--device", "cpu" if args.cpu else "cuda", "--workdir", str(workdir), "--json", str(out / "bench.json"),
             "--child-timeout", str(round(max(30, (left() - 60) / 2)))]
    print(f"== benchmark (at most {left() - 10:.0f} s)", flush=True)
    report["bench"] = run_part(bench, out / "bench.log", left() - 10)
    if (out / "bench.json").is_file():
        report["bench"].update(json.loads((out / "bench.json").read_text()))

    report["seconds"] = round(time.time() - args.started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print_failures(report, out)
    print_summary(report, bench_table(out / "bench.log"), out)
    env, tests = report["environment"], report["tests"]
    ok = "error" not in env and not env["wheel_problems"] and tests["exit_code"] == report["bench"]["exit_code"] == 0
    return 0 if ok else 1


def print_failures(report: dict, out: Path) -> None:
    """The end of a failed part's log (the whole log is in $OUT), before the summary."""
    if report["tests"]["exit_code"] != 0:
        print(f"\n-- end of {out / 'tests.log'}\n" + (out / "tests.log").read_text(errors="replace")[-3000:])
    for side, error in report["bench"].get("errors", {}).items():
        print(f"\n-- benchmark, {side} side\n{error[-2000:]}")
    if report["bench"]["exit_code"] != 0 and not report["bench"].get("errors"):
        print(f"\n-- end of {out / 'bench.log'}\n" + (out / "bench.log").read_text(errors="replace")[-2000:])


def print_summary(report: dict, table: list[str], out: Path) -> None:
    env, tests = report["environment"], report["tests"]
    print(f"\nGPU check ({report['mode']}{', tiny' if report['tiny'] else ''}), {report['seconds']} s")
    if "error" in env:
        print(f"environment: {env['error']}")
    else:
        facts = env["facts"]
        where = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in facts["gpus"]) or facts["cpu"]["model"]
        versions = ", ".join(f"{k} {v}" for k, v in facts["versions"].items() if v)
        print(f"{where}; python {facts['python']}, CUDA {facts['torch_cuda']}; {versions}")
    if "bf16_peak_tflops" in env:
        print("bf16 matmul peak (TFLOP/s): " + ", ".join(f"{n}^3 {v:.0f}" for n, v in env["bf16_peak_tflops"].items()))
    for problem in env["wheel_problems"]:
        print(f"wheels: {problem}")
    for warning in env.get("warnings", []):
        print(f"env: {warning}")
    status = "timed out" if tests["timed_out"] else f"exit {tests['exit_code']}"
    print(f"CUDA tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('skipped', 0)} "
          f"skipped ({status}, {tests['seconds']} s)")
    for name in tests.get("failures", []):
        print(f"  failed: {name}")
    for reason in sorted(set(tests.get("skip_reasons", {}).values())):
        names = [n for n, r in tests["skip_reasons"].items() if r == reason]
        print(f"  skipped {len(names)}: {reason}")
    bench = report["bench"]
    status = "timed out" if bench["timed_out"] else f"exit {bench['exit_code']}"
    print(f"benchmark: {status}, {bench['seconds']} s")
    print("\n".join(table))
    print(f"\nlogs and JSON in {out}")


if __name__ == "__main__":
    sys.exit(main())
