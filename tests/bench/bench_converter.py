"""Converter speed: LLaVA JSON + 336-px JPEG folder -> shards, in samples/s, by worker count.

The input is data_tools/synthetic.py's LLaVA-Instruct-like set (length mix of 665K, ~6%
text-only). Each configuration converts the whole set into a fresh folder; rounds
alternate configurations so machine drift spreads evenly, and the table shows the median.
Wall-clock rates depend on what else the machine runs, so the table also gives the CPU
time per sample (this process and its workers) and the load average seen during the run:
on a busy box, CPU ms/sample shows the cost of the work and of the parallel overhead.
Prints one table; nothing is asserted.

    python tests/bench/bench_converter.py --samples 2000 --workers 1 2 --rounds 2 [--max-image-size 224]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-image-size", type=int, default=None, help="also time shrinking images to this size")
    parser.add_argument("--workdir", default=None, help="keep the generated input here (default: a temp folder)")
    args = parser.parse_args()

    from data_tools.convert_common import ConvertOptions
    from data_tools.convert_llava import convert_llava
    from data_tools.synthetic import build_instruct_like

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_converter_"))
    data = build_instruct_like(workdir / "input", args.samples, image_size=args.image_size)
    image_bytes = [p.stat().st_size for p in data["images"].iterdir()]
    configs = [(w, None) for w in args.workers]
    configs += [(w, args.max_image_size) for w in args.workers] if args.max_image_size else []
    rates: dict[tuple, list[float]] = {config: [] for config in configs}
    cpu_ms: dict[tuple, list[float]] = {config: [] for config in configs}
    loads = []
    megabytes: dict[tuple, float] = {}
    for _ in range(args.rounds):
        for workers, max_size in configs:
            out = workdir / "out"
            shutil.rmtree(out, ignore_errors=True)
            options = ConvertOptions(
                out, image_root=data["images"], workers=workers, max_image_size=max_size, progress=False
            )
            cpu = _cpu_seconds()
            summary = convert_llava(data["json"], options)
            cpu_ms[(workers, max_size)].append(1e3 * (_cpu_seconds() - cpu) / summary["written"])
            rates[(workers, max_size)].append(summary["written"] / summary["seconds"])
            loads.append(os.getloadavg()[0])
            megabytes[(workers, max_size)] = summary["bytes"] / 1e6
            if summary["skipped"]:
                raise SystemExit(f"the benchmark input should convert cleanly: {summary['skip_reasons']}")

    print(
        f"{args.samples} samples, {len(image_bytes)} {args.image_size}-px JPEGs "
        f"(mean {statistics.fmean(image_bytes) / 1e3:.1f} kB), median of {args.rounds} rounds, "
        f"{os.cpu_count()} cores, load average {min(loads):.1f}-{max(loads):.1f}"
    )
    print("| workers | images | samples/s | speed-up | CPU ms/sample | shards MB |")
    print("|---|---|---|---|---|---|")
    for workers, max_size in configs:
        rate = statistics.median(rates[(workers, max_size)])
        base = statistics.median(rates[(configs[0][0], max_size)])
        resize = f"shrunk to {max_size} px" if max_size else "kept as is"
        cpu = statistics.median(cpu_ms[(workers, max_size)])
        size = megabytes[(workers, max_size)]
        print(f"| {workers} | {resize} | {rate:.0f} | {rate / base:.2f}x | {cpu:.2f} | {size:.1f} |")
    if not args.workdir:
        shutil.rmtree(workdir)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers are joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
