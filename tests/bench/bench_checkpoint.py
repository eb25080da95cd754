"""Checkpoint write and resume times, and the preemption path's signal-to-exit latency, for the
demo model (recipes/demo/base.yaml: 3-layer 64-px CLIP-style tower, mlp connector, 4-layer
256-wide Llama LM) on small generated demo data. Prints one table; nothing is asserted.

    python tests/bench/bench_checkpoint.py [--workdir /tmp/bench_ckpt] [--repeats 3]

Write: `Trainer.save_checkpoint()` after one training step (DeepSpeed states, per-rank loader
and RNG state, consolidated model files, fsync, rename), timed on rank 0 between barriers.
Resume: the checks (`check_resumable`, `check_model_shapes`) plus `Trainer._resume` (DeepSpeed
`load_checkpoint`, loader position, RNG), on a freshly built trainer. Latency: SIGUSR1 sent to
the launcher of a running job (after step 3) until rank 0 has logged the stop checkpoint
(finishing the current step, agreeing, writing) and until the launcher has exited.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CONFIGS = [(1, 0), (2, 2), (2, 3)]  # (ranks, ZeRO stage)


def demo_overrides(workdir: Path, output_dir: Path, zero: int) -> list[str]:
    data = workdir / "data"
    return [
        f"model.tokenizer={data / 'tokenizer'}",
        f"data.train=[{data / 'sft' / 'shard-*.tar'}]",
        "data.eval=[]",
        f"train.output_dir={output_dir}",
        f"train.zero_stage={zero}",
        "train.progress_bar=false",
        "train.log_every=1",
    ]


def build_data(workdir: Path) -> None:
    from data_tools.demo_data import build_demo_data

    build_demo_data(workdir / "data", num_train=512, num_eval=64, image_size=64, samples_per_shard=64)


# ----------------------------------------------------------------------------- write / resume (worker)


def worker(workdir: Path, zero: int, repeats: int) -> None:
    """Runs under torchrun: one step, `repeats` saves, `repeats` resumes; rank 0 prints JSON."""
    import torch.distributed as dist

    from llava_train.recipe import load_recipe
    from llava_train.train import checkpoint as ckpt
    from llava_train.train.resume_check import check_model_shapes, check_resumable
    from llava_train.train.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    output_dir = workdir / f"write-{world}r-zero{zero}"
    overrides = demo_overrides(workdir, output_dir, zero) + ["train.max_steps=1", f"train.keep_last={repeats}"]
    recipe = load_recipe(REPO / "recipes" / "demo" / "base.yaml", overrides)
    trainer = Trainer(recipe)
    trainer.train(save_final=False)  # optimizer states exist after a step

    writes = []
    for _ in range(repeats):
        trainer.step += 1  # a new step folder each time, as in a run
        dist.barrier()
        start = time.perf_counter()
        path = trainer.save_checkpoint()
        writes.append(time.perf_counter() - start)

    resumes = []
    fresh = Trainer(recipe)
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        check_resumable(path, recipe, world)
        check_model_shapes(path, fresh.model)
        fresh._resume(path)
        dist.barrier()
        resumes.append(time.perf_counter() - start)
    if dist.get_rank() == 0:  # to a file of its own: the other ranks' output shares stdout and may interleave
        size = ckpt.folder_bytes(path)
        result_file(workdir, world, zero).write_text(json.dumps({"writes": writes, "resumes": resumes, "bytes": size}))


def result_file(workdir: Path, ranks: int, zero: int) -> Path:
    return workdir / f"result-{ranks}r-zero{zero}.json"


def run_worker(workdir: Path, ranks: int, zero: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           __file__, "--worker", "--workdir", str(workdir), "--zero", str(zero), "--repeats", str(repeats)]
    result = result_file(workdir, ranks, zero)
    result.unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"worker failed ({ranks} ranks, ZeRO-{zero}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------- signal-to-exit latency


def latency(workdir: Path, ranks: int, zero: int, torchrun: bool) -> dict:
    """Start a long run, send SIGUSR1 to its launcher after step 3, time until it has exited."""
    output_dir = workdir / f"latency-{ranks}r-zero{zero}-{'torchrun' if torchrun else 'plain'}"
    exit_file = output_dir.with_suffix(".exit")
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run: old metrics would fake progress
    exit_file.unlink(missing_ok=True)
    args = ["train", str(REPO / "recipes" / "demo" / "base.yaml"), *demo_overrides(workdir, output_dir, zero),
            "train.max_steps=100000", "train.save_every=0", "train.keep_last=1"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=600",
               "-m", "llava_train", *args]
    else:
        cmd = [sys.executable, "-m", "llava_train", *args]
    log_path = output_dir.with_suffix(".log")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=_env(LLAVA_TRAIN_EXIT_FILE=str(exit_file)), stdout=log,
                                stderr=subprocess.STDOUT)
        while _last_step(output_dir) < 3:
            if proc.poll() is not None:
                raise SystemExit(f"the run ended early:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.01)
        steps = _step_times(output_dir)
        start, sent = time.perf_counter(), time.time()
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=900)
        total = time.perf_counter() - start
    text = log_path.read_text()
    # rank 0 logs "<asctime> WARNING ...: SIGUSR1: stopping after step N; checkpoint PATH (S s)" once saved
    saved = re.search(r"^(\S+ \S+) WARNING .*stopping after step (\d+); checkpoint .* \(([\d.]+) s\)", text, re.M)
    if saved is None or exit_file.read_text().strip() != "75":
        raise SystemExit(f"no preemption checkpoint was reported:\n{text[-3000:]}")
    logged = datetime.datetime.strptime(saved.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return {"total": total, "saved": logged - sent, "checkpoint": float(saved.group(3)),
            "step": statistics.median(steps)}


def _last_step(output_dir: Path) -> int:
    try:
        lines = (output_dir / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["step"] for line in lines[:-1] or lines), default=0)
    except (OSError, ValueError):
        return 0


def _step_times(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()[:-1]]
    return [row["step_time_s"] for row in rows if "step_time_s" in row] or [float("nan")]


def _env(**extra) -> dict:
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    return {**os.environ, "OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled",
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_ckpt"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.workdir, args.zero, args.repeats)
        return
    build_data(args.workdir)
    print(f"| ranks | ZeRO | checkpoint size | write (median of {args.repeats}) | resume (median of {args.repeats}) |")
    print("|---|---|---|---|---|")
    for ranks, zero in CONFIGS:
        r = run_worker(args.workdir, ranks, zero, args.repeats)
        print(f"| {ranks} | {zero} | {r['bytes'] / 2**20:.1f} MiB | {statistics.median(r['writes']):.2f} s "
              f"| {statistics.median(r['resumes']):.2f} s |", flush=True)
    print()
    print("| launcher | ranks | ZeRO | step time | SIGUSR1 to checkpoint written | of which the write | "
          "SIGUSR1 to launcher exit |")
    print("|---|---|---|---|---|---|---|")
    for launcher, ranks, zero in [("plain", 1, 0), ("torchrun", 1, 0), ("torchrun", 2, 2)]:
        r = latency(args.workdir, ranks, zero, torchrun=launcher == "torchrun")
        print(f"| {launcher} | {ranks} | {zero} | {r['step']:.2f} s | {r['saved']:.2f} s | {r['checkpoint']:.2f} s "
              f"| {r['total']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
