"""Where a step's time goes: data wait, vision tower, LM forward, backward, optimizer.

Phases are wall-clock spans around the loop's calls; the vision tower is timed with
forward hooks so its share can be split out of the forward. On GPUs each boundary
synchronises the device, otherwise asynchronous kernels would be billed to whichever
phase happens to wait for them (the trainer enables that only for `llava-train bench`).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
from torch import nn


class PhaseTimer:
    def __init__(self, synchronize: bool = False):
        self.synchronize = synchronize and torch.cuda.is_available()
        self.totals: dict[str, float] = defaultdict(float)
        self._open: dict[str, float] = {}

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self._now()
        try:
            yield
        finally:
            self.totals[name] += self._now() - start

    def time_module(self, module: nn.Module, name: str) -> None:
        """Accumulate the forward time of `module` under `name` (forward hooks, nothing else)."""

        def start(*_):
            self._open[name] = self._now()

        def stop(*_):
            self.totals[name] += self._now() - self._open.pop(name)

        module.register_forward_pre_hook(start)
        module.register_forward_hook(stop)

    def pop(self) -> dict[str, float]:
        """Per-phase seconds since the last pop; the vision tower's time is split out of the forward."""
        totals, self.totals = dict(self.totals), defaultdict(float)
        if "vision" in totals and "forward" in totals:
            totals["lm_forward"] = totals.pop("forward") - totals["vision"]
        return {f"time/{name}_s": seconds for name, seconds in totals.items()}
