"""Helpers for the fault tests: NaN injection into the real objective, 2-process torchrun jobs
that can be signalled and killed, and comparisons of losses and checkpoint tensors."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

NAN_TRAIN = Path(__file__).resolve().parent / "nan_train.py"


def poisoned(objective_cls, bad_calls: set[int], how: str = "mul"):
    """A subclass of an objective whose forward number k (1-based, this process) in `bad_calls`
    returns a NaN loss made from the real one. `mul` (loss * NaN) is a NaN whose backward
    poisons every gradient behind it, like activations that overflowed; `add` (loss + NaN) is a
    NaN in the loss value only, like a 0/0 in the loss, whose gradients can stay finite."""

    class Poisoned(objective_cls):
        calls = 0

        def forward(self, model, batch):
            out = super().forward(model, batch)
            type(self).calls += 1
            if type(self).calls in bad_calls:
                nan = float("nan")
                out = dataclasses.replace(out, loss_sum=out.loss_sum * nan if how == "mul" else out.loss_sum + nan)
            return out

    return Poisoned


def metrics(output_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows if "loss" in row}


def losses(output_dir: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in metrics(output_dir).items()}


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts/lists, by key path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}/{key}"))
    return out


def deepspeed_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """All tensors DeepSpeed saved: weights, fp32 master partitions, Adam moments and step counts."""
    out = {}
    for file in sorted((checkpoint / "deepspeed").rglob("*.pt")):
        out.update(tensors(torch.load(file, map_location="cpu", weights_only=False), file.name))
    return out


# ----------------------------------------------------------------------------- 2-process jobs


def write_recipe(recipe: dict, workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def torchrun_cmd(recipe_file: Path, *args: str, nproc: int = 2, script: Path | None = None,
                 rendezvous: tuple[str, ...] = ("--standalone",), rank_logs: Path | None = None) -> list[str]:
    """torchrun on this machine alone, or with `rendezvous` options as one node of several."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}",
           # forward SIGUSR1 to the ranks as launch/slurm/train.sbatch does; give them time to checkpoint
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=60"]
    if rank_logs is not None:  # each rank's stdout/stderr also to a file of its own (see rank_stderr)
        cmd += [f"--log-dir={rank_logs}", "--tee=3"]
    cmd += [str(script)] if script is not None else ["-m", "llava_train"]
    return cmd + ["train", str(recipe_file), *args]


def rank_stderr(rank_logs: Path, rank: int) -> str:
    """What one rank wrote to stderr (its log lines), uninterleaved with the other ranks' output."""
    files = sorted(rank_logs.glob(f"*/attempt_0/{rank}/stderr.log"))  # torchrun: <run id>/attempt_<n>/<rank>/
    assert len(files) == 1, f"expected one stderr.log for rank {rank} under {rank_logs}, found {files}"
    return files[0].read_text()


def job_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", **extra}


def run_job(cmd: list[str], workdir: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    with open(workdir / "job.log", "w") as log:
        return subprocess.run(cmd, env=job_env(**env), stdout=log, stderr=subprocess.STDOUT, timeout=timeout)


class Job:
    """A torchrun job in the background, with its rank processes found for signalling."""

    def __init__(self, cmd: list[str], workdir: Path, log_name: str = "job.log", new_session: bool = False,
                 **env: str):
        self.workdir = workdir
        self.log_path = workdir / log_name
        self._log = open(self.log_path, "w")
        # new_session: torchrun leads its own process group, like the launcher of one node
        self.proc = subprocess.Popen(cmd, env=job_env(**env), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=new_session)

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of the worker processes (torchrun starts each in its own session)."""
        import psutil

        found = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                env = child.environ()
            except psutil.Error:
                continue
            if "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
                found[int(env["RANK"])] = child.pid
        return found

    def wait_for(self, condition, what: str, timeout: float = 120, poll: float = 0.02):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended (rc {self.proc.returncode}) before {what}:\n{self.log()}")
            time.sleep(poll)
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    def signal_all(self, sig: signal.Signals) -> None:
        """`sig` to torchrun and to every rank at once (SIGSTOP freezes the job where it is)."""
        for pid in [self.proc.pid, *self.ranks().values()]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL to torchrun and to every rank: the whole job dies at once."""
        self.signal_all(signal.SIGKILL)
        self.wait(timeout=30)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()[-6000:]  # the children write to the file directly


def last_logged_step(output_dir: Path) -> int:
    try:
        steps = metrics(output_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return max(steps, default=0)


# ----------------------------------------------------------------------------- shared reference run

REFERENCE_STEPS = 30
_reference: dict[tuple, dict[int, float]] = {}


def fault_recipe(demo_data: Path, output_dir: Path, **train) -> dict:
    """The tiny recipe with a constant learning rate (runs of any length follow one trajectory,
    so a run stopped at step S and resumed can be compared with one reference run) and no eval
    (every forward is a training forward)."""
    from tests.conftest import tiny_recipe_dict

    r = tiny_recipe_dict(demo_data, output_dir, **{"log_every": 1, "min_lr_ratio": 1.0, **train})
    r["data"]["eval"] = []
    return r


def reference_losses(demo_data: Path, workdir: Path, steps: int = REFERENCE_STEPS, **train) -> dict[int, float]:
    """Losses of an uninterrupted 2-rank run of `steps` steps with these `train` settings (each set
    run once per session)."""
    key = (steps, *sorted(train.items()))
    if key not in _reference:
        r = fault_recipe(demo_data, workdir / "out", max_steps=steps, **train)
        proc = run_job(torchrun_cmd(write_recipe(r, workdir)), workdir)
        assert proc.returncode == 0, (workdir / "job.log").read_text()[-4000:]
        _reference[key] = losses(workdir / "out")
    return _reference[key]


def resume_and_compare(demo_data: Path, workdir: Path, output_dir: Path, start: int, reference: dict[int, float]):
    """Resume the run in `output_dir` (2 ranks, --resume auto) to step start + 2 and check it
    starts at `start` + 1 and its losses equal the reference run's."""
    assert start + 2 <= REFERENCE_STEPS, f"stopped at step {start}, past the reference run's {REFERENCE_STEPS}"
    workdir.mkdir(parents=True, exist_ok=True)
    r = fault_recipe(demo_data, output_dir, max_steps=start + 2)
    rank_logs = workdir / "ranks"
    proc = run_job(torchrun_cmd(write_recipe(r, workdir), "--resume", "auto", rank_logs=rank_logs), workdir)
    assert proc.returncode == 0, (workdir / "job.log").read_text()[-4000:]
    resumed = f"resumed from {output_dir / 'checkpoints' / f'step-{start}'} at step {start}"
    assert resumed in rank_stderr(rank_logs, 0)  # rank 0 logs it; read from its own file, not the shared job.log
    got = losses(output_dir)
    for step in (start + 1, start + 2):
        assert got[step] == pytest.approx(reference[step], rel=1e-5), step
