"""Two "nodes" on one machine: two separate torchrun launchers (`--nnodes 2`, one process each)
that meet through a c10d rendezvous on 127.0.0.1, as on a real cluster, train under ZeRO-3,
stop together when one node's launcher gets SIGTERM, and resume with `--resume auto`."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from llava_train.train import checkpoint as ckpt
from llava_train.train.preemption import EXIT_PREEMPTED
from tests import faultlib

pytestmark = pytest.mark.slow

ZERO3 = {"zero_stage": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(recipe_file, workdir, *args: str, **env: str) -> list[faultlib.Job]:
    """Node 0 and node 1: one torchrun each, in its own process group, one worker each."""
    rendezvous = ("--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
                  f"--rdzv_id={workdir.name}")
    return [
        faultlib.Job(faultlib.torchrun_cmd(recipe_file, *args, nproc=1, rendezvous=(*rendezvous, f"--node_rank={r}")),
                     workdir, log_name=f"node{r}.log", new_session=True, **env)
        for r in (0, 1)
    ]


def wait_all(nodes: list[faultlib.Job]) -> list[int]:
    try:
        return [node.wait(timeout=300) for node in nodes]
    except BaseException:
        for node in nodes:
            node.kill()
        raise


def logs(nodes: list[faultlib.Job]) -> str:
    return "\n".join(f"--- {node.log_path.name}\n{node.log()}" for node in nodes)


def test_two_nodes_stop_together_on_sigterm_to_one_and_resume_exactly(demo_data, tmp_path):
    reference = faultlib.reference_losses(demo_data, tmp_path / "reference", **ZERO3)
    out = tmp_path / "out"
    exit_file = tmp_path / "exit"  # on the shared filesystem: whichever node holds rank 0 writes it
    run = tmp_path / "run"
    recipe = faultlib.write_recipe(faultlib.fault_recipe(demo_data, out, max_steps=1000, **ZERO3), run)
    nodes = start_nodes(recipe, run, LLAVA_TRAIN_EXIT_FILE=str(exit_file))
    try:
        nodes[0].wait_for(lambda: faultlib.last_logged_step(out) >= 2, "step 2")
        workers = [node.wait_for(node.ranks, "its worker") for node in nodes]
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    assert sorted(rank for w in workers for rank in w) == [0, 1], workers  # one rank per node
    # The node without rank 0 (which writes the manifest): the decision must cross nodes.
    signalled = next(i for i, w in enumerate(workers) if 0 not in w)
    os.killpg(nodes[signalled].proc.pid, signal.SIGTERM)  # as SLURM signals a node's task

    codes = wait_all(nodes)
    assert all(code != 0 for code in codes), logs(nodes)  # torchrun turns any failing worker into 1...
    assert exit_file.read_text() == f"{EXIT_PREEMPTED}\n", logs(nodes)  # ...rank 0 leaves the real code
    other = nodes[1 - signalled]  # its workers failed on their own: torchrun prints their exit code
    assert f"exitcode  : {EXIT_PREEMPTED}" in other.log(), logs(nodes)
    stop = faultlib.last_logged_step(out)
    assert [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")] == [f"step-{stop}"], logs(nodes)
    assert stop + 2 <= faultlib.REFERENCE_STEPS, f"stopped at step {stop}, past the reference run"

    # Relaunch both nodes (a new rendezvous, as a requeued job gets) to two steps past the stop.
    resume = tmp_path / "resume"
    recipe = faultlib.write_recipe(faultlib.fault_recipe(demo_data, out, max_steps=stop + 2, **ZERO3), resume)
    nodes = start_nodes(recipe, resume, "--resume", "auto")
    assert wait_all(nodes) == [0, 0], logs(nodes)
    assert f"resumed from {out / 'checkpoints' / f'step-{stop}'} at step {stop}" in logs(nodes)
    got = faultlib.losses(out)
    assert sorted(got) == list(range(1, stop + 3))
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-6), step
