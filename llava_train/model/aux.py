"""One place for auxiliary losses and metrics reported by attached modules.

A module (a router's balance loss, a mixture-of-depths retention rate) calls `add`
during the forward; the objective `drain`s the store exactly once per forward and adds
the losses to its own, so no term is counted twice and each is logged on its own.
"""

from __future__ import annotations

import torch


class AuxLosses:
    def __init__(self) -> None:
        self._losses: dict[str, torch.Tensor] = {}
        self._metrics: dict[str, float] = {}

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        """Accumulate a weighted loss term; repeated names (one per layer) are summed."""
        self._losses[name] = self._losses[name] + value if name in self._losses else value

    def add_metric(self, name: str, value: float) -> None:
        self._metrics[name] = float(value)

    def drain(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        losses, metrics = self._losses, self._metrics
        self._losses, self._metrics = {}, {}
        return losses, metrics
