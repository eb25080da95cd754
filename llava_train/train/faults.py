"""Non-finite losses: skip the step on every rank, count it, stop after too many in a row.

How a step is skipped under DeepSpeed. The decision is taken after each micro-batch's forward
and before its backward, all-reduced so every rank takes the same path (ZeRO-2/3 reduce
gradients inside backward hooks; ranks running different backwards would deadlock). From the
first bad micro-batch on, the step's micro-batches backpropagate their loss times zero rather
than their loss. Every `engine.backward`/`engine.step` call still happens, with DeepSpeed's
per-backward set-up (hooked to the forward's outputs, so the zero must come from them), its
micro-step counter, bucket flushes and end-of-step gradient zeroing exactly as in a good step.
Where the forward's activations are finite (a NaN made by the loss itself) the gradients are
exact zeros; where they are not, some gradients are NaN, and are thrown away at the boundary
with the rest. At the boundary our optimizer's `step` is a no-op (`suppressed_update`), so the
step's good micro-batches are dropped too: weights, Adam moments and Adam's step count stay as
they were. (DeepSpeed has no public "skip this update" for ZeRO-0..3 alike: its own overflow
skip exists for ZeRO >= 1 only and sees only non-finite gradients; every stage does call the
optimizer it was given.)

The skipped step still counts as a step: the data it consumed stays consumed and the LR
schedule advances, so `lr` stays a function of the step number.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from llava_train.train import checkpoint as ckpt

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss was non-finite for `train.max_bad_steps` steps in a row."""


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if `flag` is true on any rank (a collective)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def zero_loss(loss: torch.Tensor) -> torch.Tensor:
    """The loss a skipped micro-batch backpropagates: zero, through the forward's outputs."""
    return loss * 0.0


@contextlib.contextmanager
def suppressed_update(engine, optimizer: torch.optim.Optimizer, suppress: bool):
    """Around `engine.step()`: when `suppress` is true, `optimizer.step()` is a no-op inside.

    DeepSpeed calls the optimizer it was given (our torch AdamW: directly under ZeRO-0, on the
    fp32 partitions under ZeRO-1..3), then copies those partitions back to the model, clears the
    gradients and advances its counters; only the update itself is left out. If DeepSpeed
    skipped the update on its own (ZeRO >= 1 seeing NaN gradients), it also held back the LR
    schedule, which is then advanced here, as for any other skipped step.
    """
    if not suppress:
        yield
        return
    skipped_before = engine.skipped_steps
    own = optimizer.__dict__.get("step")  # LR schedulers wrap `step` per instance: put that back
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own
    if engine.skipped_steps > skipped_before and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()


class NonFiniteGuard:
    """Decides, per micro-batch, whether the step is bad, and counts bad steps."""

    def __init__(self, max_bad_steps: int, checkpoint_root: Path, device: torch.device | str, rank: int = 0):
        self.max_bad_steps = max_bad_steps
        self.checkpoint_root = Path(checkpoint_root)
        self.device = device
        self.rank = rank
        self.skipped_total = 0  # steps skipped by this process (the `nonfinite_skipped` metric)
        self.streak = 0
        self.last_good_step = 0

    def is_bad(self, loss: torch.Tensor, step: int) -> bool:
        """All-reduced: true on every rank if the loss is non-finite on any rank."""
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        if local_bad:
            log.warning("rank %d: step %d: the loss is %s; skipping the step on all ranks", self.rank, step,
                        float(loss.detach()))
        return any_rank(local_bad, self.device)

    def end_step(self, step: int, skipped: bool) -> None:
        """Book-keep a finished step; raise NonFiniteLossError after too many bad ones in a row."""
        if not skipped:
            self.streak, self.last_good_step = 0, step
            return
        self.skipped_total += 1
        self.streak += 1
        if self.rank == 0:
            log.warning("step %d skipped: non-finite loss (%d in a row, stopping at %d; %d skipped in total)",
                        step, self.streak, self.max_bad_steps, self.skipped_total)
        if self.streak >= self.max_bad_steps:
            raise NonFiniteLossError(self._stop_message(step))

    def _stop_message(self, step: int) -> str:
        first = step - self.streak + 1
        saved = ckpt.complete_checkpoints(self.checkpoint_root)
        good = [p for p in saved if _step_of(p) <= self.last_good_step]
        if good:
            where = f"the last good checkpoint is {good[-1]}"
        elif saved:  # saved during the streak: skipped steps leave the weights as they were
            where = f"the newest checkpoint, {saved[-1]}, holds those weights"
        else:
            where = "no checkpoint has been saved yet (train.save_every)"
        return (
            f"the loss was non-finite (NaN/inf) for {self.streak} steps in a row, steps {first} to {step} "
            f"(train.max_bad_steps={self.max_bad_steps}); stopping at step {step}. The weights are those of "
            f"step {self.last_good_step}; {where}. Lower train.lr or train.max_grad_norm, or look for broken "
            "samples in that part of the data, then resume from it with --resume PATH"
        )


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])
