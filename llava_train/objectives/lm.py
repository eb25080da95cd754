"""Next-token cross-entropy at supervised positions only.

LLaVA computes `[all tokens, vocab]` logits although image and prompt tokens carry no
label; here the LM head runs only on the hidden states whose next token is supervised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llava_train.data.batch import IGNORE_INDEX, Batch


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


def lm_objective(model, batch: Batch) -> ObjectiveOutput:
    hidden = model(batch)
    mask, targets = supervised_positions(batch.labels)
    picked = hidden[:, :-1][mask]
    logits = model.output_embeddings(picked).float()
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    aux_losses, metrics = model.aux.drain()
    return ObjectiveOutput(loss_sum=loss_sum, num_tokens=int(mask.sum()), aux_losses=aux_losses, metrics=metrics)


OBJECTIVES = {"lm": lm_objective}
