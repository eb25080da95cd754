"""Next-token cross-entropy at supervised positions only.

LLaVA computes `[all tokens, vocab]` logits although image and prompt tokens carry no
label; here the LM head runs only on the hidden states whose next token is supervised,
and even those logits exist one chunk of rows at a time (`kernels.linear_cross_entropy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import kernels
from llava_train.data.batch import IGNORE_INDEX, Batch
from llava_train.recipe import LossConfig


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # summed over supervised tokens; the trainer normalises globally
    num_tokens: int  # supervised tokens in this micro-batch
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # already per-micro-batch means
    metrics: dict[str, float] = field(default_factory=dict)


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions t whose label t+1 is supervised, the targets at those positions)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


def make_lm_objective(loss: LossConfig | None = None):
    """The `lm` objective `(model, batch) -> ObjectiveOutput` with the recipe's loss options."""
    cfg = loss or LossConfig()

    def lm_objective(model, batch: Batch) -> ObjectiveOutput:
        hidden = model(batch)
        mask, targets = supervised_positions(batch.labels)
        head = model.output_embeddings  # read inside the engine's forward: only there does ZeRO-3 gather it
        out = kernels.linear_cross_entropy(
            hidden[:, :-1][mask],
            head.weight,
            targets,
            bias=getattr(head, "bias", None),
            reduction="sum",
            chunk_size=cfg.chunk_size,
            label_smoothing=cfg.label_smoothing,
            z_loss=cfg.z_loss,
            backend=cfg.backend,
        )
        aux_losses, metrics = model.aux.drain()
        if cfg.z_loss:
            metrics["z_loss_sum"] = float(out.z_loss_term)  # the z-loss part of loss_sum, summed like it
        return ObjectiveOutput(loss_sum=out.loss, num_tokens=out.num_tokens, aux_losses=aux_losses, metrics=metrics)

    return lm_objective


OBJECTIVES = {"lm": make_lm_objective}  # name -> factory(LossConfig) -> objective(model, batch)
