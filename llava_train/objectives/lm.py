"""Next-token cross-entropy at supervised positions only.

LLaVA computes `[all tokens, vocab]` logits although image and prompt tokens carry no
label; here the LM head runs only on the hidden states whose next token is supervised,
and even those logits exist one chunk of rows at a time (`kernels.linear_cross_entropy`).
The loss options live in `stage.loss` (shared with the CE terms of other objectives).
"""

from __future__ import annotations

import torch

import kernels
from llava_train.data.batch import IGNORE_INDEX, Batch
from llava_train.objectives.base import Objective, ObjectiveOutput, register_objective
from llava_train.recipe import LossConfig


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions t whose label t+1 is supervised, the targets at those positions)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


def cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, cfg: LossConfig):
    """Summed CE over supervised next tokens (`kernels.linear_cross_entropy`'s output)."""
    mask, targets = supervised_positions(labels)
    return kernels.linear_cross_entropy(
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


@register_objective
class LMObjective(Objective):
    name = "lm"
    normaliser = "tokens"

    def forward(self, model, batch: Batch) -> ObjectiveOutput:
        out = model(batch)
        # The head is read inside the engine's forward: only there does ZeRO-3 gather it.
        ce = cross_entropy_sum(out.hidden_states, model.output_embeddings, batch.labels, self.loss_config)
        metrics = dict(out.aux_metrics)
        if self.loss_config.z_loss:
            metrics["z_loss_sum"] = float(ce.z_loss_term)  # the z-loss part of loss_sum, summed like it
        return ObjectiveOutput(loss_sum=ce.loss, count=ce.num_tokens, aux_losses=out.aux_losses, metrics=metrics)
