"""Preemption: SIGUSR1/SIGTERM make a running 2-process job finish its step, checkpoint and exit
with EXIT_PREEMPTED; `--resume auto` then continues exactly where the uninterrupted run would be."""

from __future__ import annotations

import os
import signal

import pytest

from llava_train.train import checkpoint as ckpt
from llava_train.train.preemption import EXIT_PREEMPTED, StopSignal
from tests import faultlib


def test_stop_signal_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process with the default handler
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGUSR1
        assert stop.agreed()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_exit_code_is_written_for_the_launcher(tmp_path, monkeypatch):
    from llava_train.train.preemption import record_exit_code

    exit_file = tmp_path / "logs" / "job.exit"
    monkeypatch.setenv("LLAVA_TRAIN_EXIT_FILE", str(exit_file))
    monkeypatch.setenv("RANK", "1")
    assert record_exit_code(EXIT_PREEMPTED) == EXIT_PREEMPTED
    assert not exit_file.exists()  # rank 0 speaks for the job
    monkeypatch.setenv("RANK", "0")
    record_exit_code(EXIT_PREEMPTED)
    assert exit_file.read_text() == f"{EXIT_PREEMPTED}\n"


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    return faultlib.reference_losses(demo_data, tmp_path_factory.mktemp("reference"))


def start_long_run(demo_data, tmp_path):
    out = tmp_path / "out"
    r = faultlib.fault_recipe(demo_data, out, max_steps=1000)  # save_every 0: only the stop saves
    exit_file = tmp_path / "exit"
    job = faultlib.Job(faultlib.torchrun_cmd(faultlib.write_recipe(r, tmp_path)), tmp_path,
                       LLAVA_TRAIN_EXIT_FILE=str(exit_file))
    job.wait_for(lambda: faultlib.last_logged_step(out) >= 2, "step 2")
    return job, out, exit_file


def assert_stopped_with_a_checkpoint(job, out, exit_file) -> int:
    returncode = job.wait()
    log = job.log()
    assert returncode != 0, log  # torchrun reports any failing worker as 1...
    assert exit_file.read_text() == f"{EXIT_PREEMPTED}\n", log  # ...so rank 0 leaves the real code here
    stop = faultlib.last_logged_step(out)
    checkpoints = ckpt.complete_checkpoints(out / "checkpoints")
    assert [p.name for p in checkpoints] == [f"step-{stop}"], log  # the last step logged is the one saved
    assert ckpt.read_manifest(checkpoints[0])["step"] == stop
    return stop


def test_signal_to_one_rank_stops_all_after_the_same_step_and_resume_matches(demo_data, tmp_path, reference):
    job, out, exit_file = start_long_run(demo_data, tmp_path)
    ranks = job.wait_for(lambda: job.ranks() if len(job.ranks()) == 2 else None, "both ranks")
    os.kill(ranks[1], signal.SIGUSR1)  # not rank 0, which writes the manifest: the decision must travel
    stop = assert_stopped_with_a_checkpoint(job, out, exit_file)
    assert f"exitcode  : {EXIT_PREEMPTED}" in job.log()  # torchrun's summary of the failed workers
    for step, loss in faultlib.losses(out).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
    faultlib.resume_and_compare(demo_data, tmp_path / "resume", out, stop, reference)


def test_sigterm_to_torchrun_is_forwarded_and_stops_the_job(demo_data, tmp_path):
    # What SLURM does: the signal goes to the launcher (one per node), which passes it on.
    job, out, exit_file = start_long_run(demo_data, tmp_path)
    job.proc.send_signal(signal.SIGTERM)
    assert_stopped_with_a_checkpoint(job, out, exit_file)
