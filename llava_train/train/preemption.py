"""Stopping on request: SIGUSR1/SIGTERM become "finish this step, checkpoint, exit EXIT_PREEMPTED".

SLURM sends a warning signal before a time limit or a preemption (`#SBATCH --signal=USR1@120`);
torchrun forwards it to the ranks when SIGUSR1 is in its `--signals-to-handle`. The signal may
reach one rank only, or the ranks at different moments, so the handler merely records it and
the training loop asks `StopSignal.agreed()` once per step: a one-element all-reduce (max) that
makes every rank stop after the same step, as a checkpoint needs all of them.

The exit code tells the launcher to requeue. torchrun reports any non-zero worker exit as its
own exit code 1, so rank 0 also writes the code to `$LLAVA_TRAIN_EXIT_FILE` when that is set
(launch/slurm/train.sbatch sets it and reads it back).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

# EX_TEMPFAIL from sysexits.h, "a temporary failure; the user is invited to retry": the run
# stopped cleanly after writing a checkpoint and `--resume auto` continues it. Nothing else in
# the stack exits with 75 (Python errors exit 1, usage errors 2, signals 128+N, timeout 124).
EXIT_PREEMPTED = 75
EXIT_FILE_ENV = "LLAVA_TRAIN_EXIT_FILE"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignal:
    """Records the first stop signal; `agreed()` turns it into a decision shared by all ranks.

    Use as a context manager around the training loop: the previous handlers come back on
    exit, so a process that stopped training (or a test) gets the default behaviour again.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None  # on this rank
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "StopSignal":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # Only record: the loop is somewhere inside a step (maybe inside a collective), and
        # stopping is only safe at a step boundary, reached by all ranks together.
        if self.received is None:
            self.received = signal.Signals(signum)

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank if any rank has received a stop signal. A collective: every rank
        must call it at the same point of every step."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def record_exit_code(code: int) -> int:
    """Write `code` to $LLAVA_TRAIN_EXIT_FILE (rank 0 only) and return it, so a launcher behind
    torchrun learns how the run ended."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path and int(os.environ.get("RANK", "0")) == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"{code}\n")
    return code
