"""launch/slurm/train.sbatch: lint, and its launch and requeue decisions with fake SLURM commands
(`srun`, `scontrol`, `scancel` stubs on PATH that record their arguments)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from llava_train.train.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"

# srun: records its arguments; optionally waits for a signal to reach the job (a file written by
# the scancel stub), writes $FAKE_REPORT as rank 0 would, and exits with $FAKE_SRUN_RC.
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
if [[ -n ${FAKE_WAIT_FOR_SIGNAL:-} ]]; then
    touch "$FAKE_DIR/srun.started"
    while [[ ! -e $FAKE_DIR/signalled ]]; do sleep 0.05; done
fi
if [[ -n ${FAKE_REPORT:-} ]]; then echo "$FAKE_REPORT" > "$LLAVA_TRAIN_EXIT_FILE"; fi
exit "${FAKE_SRUN_RC:-0}"
"""
# scontrol: two hostnames; the job's record from $FAKE_JOB (a running job by default; after
# FAKE_REQUEUED_MEANWHILE=1 a refused requeue finds the restart count up); requeues are logged.
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'node-a\\nnode-b\\n'; exit 0; fi
if [[ $1 == show && $2 == job ]]; then
    if [[ -e $FAKE_DIR/requeue.refused ]]; then echo "JobId=4242 JobState=COMPLETING Reason=None Restarts=1"
    else echo "JobId=4242 ${FAKE_JOB:-JobState=RUNNING Reason=None Restarts=0}"; fi
    exit 0
fi
echo "$*" >> "$FAKE_DIR/scontrol.log"
if [[ -n ${FAKE_REQUEUED_MEANWHILE:-} ]]; then touch "$FAKE_DIR/requeue.refused"; exit 1; fi
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scancel.log"
touch "$FAKE_DIR/signalled"
"""


@pytest.fixture
def slurm(tmp_path):
    """A submit directory with a recipe, fake SLURM commands and a SLURM-like environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "recipe.yaml").write_text("{}\n")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_DIR": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "llava-train",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_ON_NODE": "32",
    }
    return tmp_path, env


def submit(slurm, *args: str, **env: str) -> subprocess.CompletedProcess:
    workdir, base = slurm
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=workdir, env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def requeues(workdir: Path) -> list[str]:
    log = workdir / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def test_bash_parses_the_script():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_shellcheck_finds_nothing():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n still checks the syntax")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_launches_one_torchrun_per_node_with_c10d_rendezvous_and_resume_auto(slurm):
    workdir, _ = slurm
    proc = submit(slurm, "recipe.yaml", "train.lr=2e-5", "data.max_length=1024", FAKE_REPORT="0")
    assert proc.returncode == 0, proc.stderr
    args = (workdir / "srun.args").read_text().splitlines()
    assert args[0] == "--kill-on-bad-exit=1"
    for expected in ("--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-id=4242",
                     "--rdzv-endpoint=node-a:29500", "--max-restarts=0",
                     "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"):
        assert expected in args, expected
    tail = args[args.index("llava_train"):]
    assert tail == ["llava_train", "train", "recipe.yaml", "train.lr=2e-5", "data.max_length=1024", "--resume", "auto"]
    assert requeues(workdir) == []


@pytest.mark.parametrize(
    "srun_rc, report, expected_exit, requeued",
    [
        (1, str(EXIT_PREEMPTED), 0, True),  # torchrun says 1, rank 0 says preempted: requeue
        (EXIT_PREEMPTED, None, 0, True),  # launched without torchrun in between: the code itself
        (0, "0", 0, False),  # finished
        (1, None, 1, False),  # crashed before reporting (a traceback): no endless requeue loop
        (1, "2", 2, False),  # refused (bad recipe, damaged checkpoint, non-finite loss)
    ],
)
def test_requeues_on_preemption_only(slurm, srun_rc, report, expected_exit, requeued):
    workdir, _ = slurm
    env = {"FAKE_SRUN_RC": str(srun_rc), **({"FAKE_REPORT": report} if report is not None else {})}
    proc = submit(slurm, "recipe.yaml", **env)
    assert proc.returncode == expected_exit, proc.stdout + proc.stderr
    assert requeues(workdir) == (["requeue 4242"] if requeued else [])


@pytest.mark.parametrize(
    "job, expected_exit, requeued, says",
    [
        # scancel: SLURM is ending the job and will not bring it back; neither may we
        ("JobState=COMPLETING Reason=None Restarts=0", EXIT_PREEMPTED, False, "was cancelled"),
        # the time limit ended it (the warning came too late or not at all): requeue
        ("JobState=COMPLETING Reason=TimeLimit Restarts=0", 0, True, "requeueing job 4242"),
        # `scontrol requeue` or a preemption with PreemptMode=REQUEUE: SLURM requeues it itself
        ("JobState=COMPLETING Reason=None Restarts=1", 0, False, "SLURM requeues job 4242 itself"),
    ],
)
def test_after_sigterm_the_job_record_says_whether_to_requeue(slurm, job, expected_exit, requeued, says):
    workdir, _ = slurm
    proc = submit(slurm, "recipe.yaml", FAKE_SRUN_RC="1", FAKE_REPORT=str(EXIT_PREEMPTED), FAKE_JOB=job)
    assert proc.returncode == expected_exit, proc.stdout + proc.stderr
    assert requeues(workdir) == (["requeue 4242"] if requeued else [])
    assert says in proc.stdout + proc.stderr


def test_a_requeue_refused_because_slurm_requeued_the_job_meanwhile_is_no_error(slurm):
    # A preemption with GraceTime signals the tasks while the job still runs, then requeues it.
    workdir, _ = slurm
    proc = submit(slurm, "recipe.yaml", FAKE_SRUN_RC="1", FAKE_REPORT=str(EXIT_PREEMPTED),
                  FAKE_REQUEUED_MEANWHILE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SLURM requeues job 4242 itself" in proc.stdout and "failed" not in proc.stderr


def test_a_stale_report_from_the_previous_start_is_ignored(slurm):
    workdir, _ = slurm
    (workdir / "logs").mkdir()
    (workdir / "logs" / "llava-train-4242.exit").write_text(f"{EXIT_PREEMPTED}\n")  # the last start's
    proc = submit(slurm, "recipe.yaml", FAKE_SRUN_RC="1")
    assert proc.returncode == 1 and requeues(workdir) == []


def test_stops_requeueing_after_max_requeues(slurm):
    workdir, _ = slurm
    proc = submit(slurm, "recipe.yaml", FAKE_SRUN_RC="1", FAKE_REPORT=str(EXIT_PREEMPTED),
                  SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert proc.returncode == EXIT_PREEMPTED and requeues(workdir) == []
    assert "MAX_REQUEUES" in proc.stderr


def test_usr1_to_the_batch_shell_is_passed_to_the_tasks_and_the_job_requeues(slurm):
    # `--signal=B:USR1@120` signals the batch shell only: it must forward the signal and keep
    # waiting for srun (whose ranks then checkpoint) before deciding.
    workdir, base = slurm
    env = {**base, "FAKE_WAIT_FOR_SIGNAL": "1", "FAKE_SRUN_RC": "1", "FAKE_REPORT": str(EXIT_PREEMPTED)}
    proc = subprocess.Popen(["bash", str(SCRIPT), "recipe.yaml"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (workdir / "srun.started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert (workdir / "scancel.log").read_text().split() == ["--signal=USR1", "4242"]
    assert requeues(workdir) == ["requeue 4242"]


def test_refuses_to_run_without_a_recipe_or_outside_slurm(slurm):
    assert submit(slurm).returncode == 2
    proc = submit(slurm, "missing.yaml")
    assert proc.returncode == 2 and "recipe missing.yaml not found" in proc.stderr
    workdir, base = slurm
    outside = subprocess.run(["bash", str(SCRIPT), "recipe.yaml"], cwd=workdir,
                             env={k: v for k, v in base.items() if k != "SLURM_JOB_ID"}, capture_output=True,
                             text=True)
    assert outside.returncode == 2 and "submit this script with sbatch" in outside.stderr
