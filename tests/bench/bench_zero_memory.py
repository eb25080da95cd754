"""Per-rank memory of model states (parameters, gradients, optimizer states) at world size 1 vs 2.

Runs the demo model (frozen vision tower, trainable connector + LM) for one step under
ZeRO-0/2/3 with 1 and 2 gloo processes on the CPU and prints rank 0's model-state bytes
as counted by llava_train.train.memory (distinct tensor storages; RSS would mix in
activations and allocator caches). Needs the demo data (`llava-train demo` builds it).

    python tests/bench/bench_zero_memory.py [--workdir runs/bench_zero]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(zero: int, nproc: int, workdir: Path) -> dict:
    out = workdir / f"zero{zero}-ws{nproc}"
    overrides = [
        f"train.output_dir={out}", "train.max_steps=1", f"train.zero_stage={zero}", "train.micro_batch_size=8",
        "stage.trainable.vision=false", "stage.init_from=null", "data.eval=[]", "train.progress_bar=false",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "llava_train", "train", "recipes/demo/sft.yaml", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-4000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(row for row in rows if "model_state_gb/total" in row)
    return {k.split("/")[1]: v * 1024 for k, v in first.items() if k.startswith("model_state_gb/")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/bench_zero")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    print("| ZeRO | world size | parameters MiB | gradients MiB | optimizer MiB | total MiB | total vs ws=1 |")
    print("|---|---|---|---|---|---|---|")
    for zero in (0, 2, 3):
        base = None
        for nproc in (1, 2):
            if zero == 0 and nproc == 2:
                continue  # ZeRO-0 is plain data parallelism: nothing partitioned
            m = run(zero, nproc, workdir)
            base = base or m["total"]
            print(f"| {zero} | {nproc} | {m['parameters']:.1f} | {m['gradients']:.1f} | {m['optimizer']:.1f} "
                  f"| {m['total']:.1f} | {m['total'] / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
