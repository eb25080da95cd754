"""launch/slurm/train.sbatch on a real (one-node, localhost) SLURM cluster: the job is requeued by
`scontrol requeue`, then warned of its time limit by SLURM's own `--signal=USR1@120`, each time
checkpoints and comes back, and finishes with the losses of an uninterrupted run; `scancel` ends
such a job for good."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from llava_train.train import checkpoint as ckpt
from llava_train.train.preemption import EXIT_PREEMPTED
from tests import faultlib, slurmlib

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "slurm" / "train.sbatch"
ZERO3 = {"zero_stage": 3}


@pytest.fixture(scope="module")
def cluster():
    missing = slurmlib.missing_binaries()
    if missing:
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge "
                    "(.ci/run does)")
    slurm = slurmlib.LocalSlurm()
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


class Submitted:
    """One sbatch job of train.sbatch, its submit folder, output and state."""

    def __init__(self, cluster: slurmlib.LocalSlurm, submit_dir: Path, out: Path, *sbatch_args: str, **env: str):
        self.cluster, self.dir, self.out = cluster, submit_dir, out
        (submit_dir / "logs").mkdir(parents=True, exist_ok=True)
        env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(slurmlib.free_port()), "PYTHON": sys.executable,
               "SHUTDOWN_GRACE": str(slurmlib.KILL_WAIT - 10), **env}
        self.id = cluster.sbatch(*sbatch_args, str(SCRIPT), "recipe.yaml", cwd=submit_dir,
                                 env=cluster.env(**faultlib.job_env(**env)))

    def state(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def output(self) -> str:
        """Everything the job printed, all starts (`--open-mode=append`)."""
        path = self.dir / "logs" / f"llava-train-{self.id}.out"
        return path.read_text(errors="replace") if path.exists() else "(no job output yet)"

    def log(self) -> str:
        return self.output()[-6000:]

    def exit_code(self) -> str:
        return (self.dir / "logs" / f"llava-train-{self.id}.exit").read_text().strip()

    def wait_for(self, condition, what: str, timeout: float = 240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            value = condition(state)
            if value:
                return value
            if state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            time.sleep(0.5)
        raise AssertionError(f"job {self.id} is {state['JobState']} (restarts {state['Restarts']}), waiting for "
                             f"{what}:\n{self.log()}\n{self.cluster.logs(10)}")

    def wait_for_step(self, step: int, start: int) -> None:
        self.wait_for(lambda s: s["JobState"] == "RUNNING" and s["Restarts"] == str(start)
                      and faultlib.last_logged_step(self.out) >= step, f"step {step} in start {start + 1}")

    def wait_until_requeued(self, restarts: int) -> int:
        """Wait for the job to be pending again after a stop; return the step it checkpointed."""
        self.wait_for(lambda s: s["JobState"] == "PENDING" and s["Restarts"] == str(restarts),
                      f"requeue number {restarts}")
        assert self.exit_code() == str(EXIT_PREEMPTED), self.log()  # rank 0: stopped after a checkpoint
        stop = faultlib.last_logged_step(self.out)
        newest = ckpt.complete_checkpoints(self.out / "checkpoints")[-1]
        assert newest.name == f"step-{stop}" and ckpt.read_manifest(newest)["step"] == stop, self.log()
        return stop

    def release(self, **update: str) -> None:
        """Start the requeued job now: SLURM holds a requeued batch job for about 2 minutes
        (Reason=BeginTime) before it may start again."""
        self.cluster.scontrol("update", f"JobId={self.id}", "StartTime=now", *(f"{k}={v}" for k, v in update.items()))

    def ranks(self) -> list[psutil.Process]:
        """The training processes of this job (torchrun's workers)."""
        found = []
        for proc in psutil.process_iter():
            try:
                env = proc.environ()
            except psutil.Error:
                continue
            if env.get("SLURM_JOB_ID") == str(self.id) and "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
                found.append(proc)
        return found


REFERENCE_STEPS = 150


def write_recipe(demo_data: Path, submit_dir: Path, out: Path, max_steps: int) -> None:
    faultlib.write_recipe(faultlib.fault_recipe(demo_data, out, max_steps=max_steps, **ZERO3), submit_dir)


def test_sbatch_job_is_requeued_twice_and_matches_an_uninterrupted_run(cluster, demo_data, tmp_path):
    # Long enough for where a fast machine gets before the signals land (the step count there is not ours to fix).
    reference = faultlib.reference_losses(demo_data, tmp_path / "reference", steps=REFERENCE_STEPS, **ZERO3)
    submit, out = tmp_path / "submit", tmp_path / "out"
    write_recipe(demo_data, submit, out, max_steps=1000)  # shortened below, once we know where it stops
    # No GPUs here: --gpus-per-node=0 overrides the script's 8, NPROC_PER_NODE=2 sets the processes.
    job = Submitted(cluster, submit, out, "--gpus-per-node=0", "--time=10")

    # 1. An operator's `scontrol requeue`: SLURM sends SIGTERM to the batch shell and to the step
    #    (torchrun, which forwards it), waits KillWait for them, then queues the job again itself.
    job.wait_for_step(2, start=0)
    cluster.scontrol("requeue", str(job.id))
    first_stop = job.wait_until_requeued(1)
    assert f"stopped after a checkpoint; SLURM requeues job {job.id} itself" in job.output()

    # 2. The time limit: SLURM sends `--signal=USR1@120` (the script's own) to the step when 120 s
    #    are left. Shorten the limit to leave 60-120 s; slurmctld checks limits only every 30 s, so
    #    the ranks are frozen until torchrun has the signal (no steps run while the test waits).
    job.release()
    job.wait_for_step(first_stop + 2, start=1)
    ranks = job.ranks()
    assert len(ranks) == 2, ranks
    for rank in ranks:
        rank.send_signal(signal.SIGSTOP)
    try:
        elapsed = slurmlib.seconds(job.state()["RunTime"])
        cluster.scontrol("update", f"JobId={job.id}", f"TimeLimit={elapsed // 60 + 2}")
        job.wait_for(lambda s: "Received 10 death signal" in job.output(), "SIGUSR1 at torchrun", timeout=90)
    finally:
        for rank in ranks:
            rank.send_signal(signal.SIGCONT)
    second_stop = job.wait_until_requeued(2)
    assert f"preempted after a checkpoint: requeueing job {job.id}" in job.output()
    assert second_stop + 2 <= REFERENCE_STEPS, f"stopped at step {second_stop}, past the reference run"

    # 3. The last start finishes; a user would have kept max_steps, this shortens the test.
    write_recipe(demo_data, submit, out, max_steps=second_stop + 2)
    job.release(TimeLimit="10")
    done = job.wait_for(lambda s: s["JobState"] == "COMPLETED" and s, "the job to finish")
    assert done["ExitCode"] == "0:0" and done["Restarts"] == "2", done
    log = job.output()
    for stop in (first_stop, second_stop):
        assert f"resumed from {out / 'checkpoints' / f'step-{stop}'} at step {stop}" in log
    got = faultlib.losses(out)
    assert sorted(got) == list(range(1, second_stop + 3)), job.log()
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-6), step


# Stands in for `python -m torch.distributed.run ... -m llava_train train` (the script's $PYTHON):
# runs until SIGTERM, then ends as the trainer does after a checkpoint.
STAND_IN = """#!/usr/bin/env bash
trap 'echo 75 > "$LLAVA_TRAIN_EXIT_FILE"; exit 1' TERM
touch "$STAND_IN_STARTED"
while true; do sleep 0.1; done
"""


def test_scancel_ends_the_job_for_good(cluster, tmp_path):
    # SIGTERM and a checkpointed stop, as after a requeue, but the user cancelled: no requeue.
    stand_in = tmp_path / "stand_in"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    started = tmp_path / "started"
    (tmp_path / "recipe.yaml").write_text("{}\n")
    job = Submitted(cluster, tmp_path, tmp_path / "out", "--gpus-per-node=0", PYTHON=str(stand_in),
                    STAND_IN_STARTED=str(started))
    job.wait_for(lambda s: started.exists(), "the stand-in trainer to start", timeout=60)
    cluster.run("scancel", str(job.id))
    ended = job.wait_for(lambda s: s["JobState"] in ("CANCELLED", "PENDING") and s, "the job to end", timeout=60)
    assert ended["JobState"] == "CANCELLED" and ended["Restarts"] == "0", (ended, job.log())
    assert f"job {job.id} was cancelled" in job.output()
