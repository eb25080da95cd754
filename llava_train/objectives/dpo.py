"""Direct preference optimisation on preference pairs (DPO and its common variants).

DPO (Rafailov et al.): with the policy's and a frozen reference's log-probabilities of the chosen and the
rejected answer, minimise -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))): the policy learns to prefer
the chosen answer more than the reference does, without a reward model. Variants: `robust` (cDPO, label
smoothing eps), `hinge` (SLiC), `ipo` ((margin - 1/(2 beta))^2, log-probs averaged over tokens as TRL does),
and an SFT term on the chosen answer (RPO).

Seams: grouped examples (each pair's chosen and rejected sequences stay in one micro-batch; both run in one
concatenated forward, the batch itself), the objective seam (normaliser `pairs`; the reference is a frozen
second model from a checkpoint or exported Llava folder, partitioned under ZeRO-3, or the policy with its
adapters disabled, which costs no copy), and `kernels.sequence_logprobs` (per-sequence sums, no full logits).

Invariants (tests/test_dpo.py): policy = reference gives ln 2 and zero rewards; IPO gives (1/(2 beta))^2;
robust with eps 0 equals sigmoid; 2 ranks x 2 pairs equal 1 rank x 4 pairs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

import kernels
from llava_train.data.batch import IGNORE_INDEX, Batch
from llava_train.model.io import load_any
from llava_train.objectives.base import Objective, ObjectiveOptions, ObjectiveOutput, register_objective


class DPOOptions(ObjectiveOptions):
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "robust", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust (cDPO): the chance a label is flipped
    sft_weight: float = Field(0.0, ge=0)  # RPO: + weight x the chosen answer's mean token NLL
    average_logprobs: bool = False  # mean instead of sum over response tokens (always mean for ipo)
    reference: str | None = None  # a llava_train checkpoint or exported Llava folder; None: adapters disabled


# ----------------------------------------------------------------------------- pure functions


def preference_loss(margin: torch.Tensor, beta: float, loss: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss from the log-ratio margin (pi_c - ref_c) - (pi_r - ref_r)."""
    if loss == "sigmoid":
        return -F.logsigmoid(beta * margin)
    if loss == "robust":
        eps = label_smoothing
        return -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
    if loss == "hinge":
        return torch.relu(1 - beta * margin)
    if loss == "ipo":
        return (margin - 1 / (2 * beta)).square()
    raise ValueError(f"unknown preference loss {loss!r}")


def sample_logprobs(hidden: torch.Tensor, head: torch.nn.Module, batch: Batch, chunk_size: int):
    """(sum of response-token log-probs, response-token count) per sample [num_samples], packed or not."""
    targets = batch.labels[:, 1:]
    sequence_ids = batch.sequence_ids[:, :-1].clamp(min=0)  # padding carries no label, so its id never counts
    logps = kernels.sequence_logprobs(
        hidden[:, :-1], head.weight, targets, bias=getattr(head, "bias", None), chunk_size=chunk_size,
        sequence_ids=sequence_ids, num_sequences=batch.num_samples,
    )
    counts = torch.zeros(batch.num_samples, device=targets.device).index_add_(
        0, sequence_ids[targets != IGNORE_INDEX], torch.ones((targets != IGNORE_INDEX).sum(), device=targets.device)
    )
    return logps, counts


def pair_indices(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen sample index, rejected sample index) per pair, in group order."""
    groups = batch.num_groups
    if groups == 0:
        raise ValueError(
            "dpo trains on preference pairs, but this micro-batch holds none: point data.train at pair shards "
            "(`llava-train data convert-pairs`)"
        )
    chosen = torch.full((groups,), -1, dtype=torch.long)
    rejected = torch.full((groups,), -1, dtype=torch.long)
    for sample, (group, member) in enumerate(zip(batch.group_index.tolist(), batch.group_members)):
        (chosen if member == "chosen" else rejected)[group] = sample
    if (chosen < 0).any() or (rejected < 0).any():
        raise ValueError("a preference group lacks its chosen or rejected member; pairs must stay whole")
    return chosen, rejected


# ----------------------------------------------------------------------------- the objective


@register_objective
class DPO(Objective):
    name = "dpo"
    Options = DPOOptions
    normaliser = "pairs"
    accepts_groups = True

    def __init__(self, options: DPOOptions, build):
        super().__init__(options, build)
        if options.reference is not None:
            reference, _ = load_any(options.reference, build.zero3_config)
            self.add_frozen_model("reference", reference)

    def forward(self, model, batch: Batch) -> ObjectiveOutput:
        chosen, rejected = (i.to(batch.labels.device) for i in pair_indices(batch))
        out = model(batch)  # chosen and rejected together: one concatenated forward
        head, chunk = model.output_embeddings, self.loss_config.chunk_size
        policy_sum, counts = sample_logprobs(out.hidden_states, head, batch, chunk)
        with torch.no_grad():
            reference = self._reference_logprobs(model, batch)
        policy, counts = policy_sum, counts.clamp(min=1)
        if self.options.average_logprobs or self.options.loss == "ipo":
            policy, reference = policy_sum / counts, reference / counts
        chosen_ratio = policy[chosen] - reference[chosen]
        rejected_ratio = policy[rejected] - reference[rejected]
        margin = chosen_ratio - rejected_ratio
        losses = preference_loss(margin, self.options.beta, self.options.loss, self.options.label_smoothing)
        if self.options.sft_weight:  # RPO: the chosen answer's mean token NLL
            losses = losses - self.options.sft_weight * policy_sum[chosen] / counts[chosen]
        beta = self.options.beta
        metrics = {
            "rewards/chosen": float(beta * chosen_ratio.detach().mean()),
            "rewards/rejected": float(beta * rejected_ratio.detach().mean()),
            "rewards/margin": float(beta * margin.detach().mean()),
            "rewards/accuracy": float((margin.detach() > 0).float().mean()),
            **out.aux_metrics,
        }
        return ObjectiveOutput(losses.sum(), int(chosen.numel()), out.aux_losses, metrics)

    def _reference_logprobs(self, model, batch: Batch) -> torch.Tensor:
        head, chunk = model.output_embeddings, self.loss_config.chunk_size
        if "reference" in self.frozen:
            reference = self.frozen["reference"]
            return sample_logprobs(reference(batch).hidden_states, reference.output_embeddings, batch, chunk)[0]
        with model.adapters_disabled():  # the policy without its adapters: no second copy
            return sample_logprobs(model(batch).hidden_states, head, batch, chunk)[0]

    @classmethod
    def check_recipe(cls, options: DPOOptions, recipe) -> None:
        adapters = recipe.stage.name == "sft_lora" or bool(recipe.modules)
        if options.reference is None and not adapters:
            raise ValueError(
                "without `reference`, the reference is the policy with its adapters disabled, but this stage trains "
                "no adapters: use stage.name=sft_lora (or a module), or set stage.objective.reference to a checkpoint"
            )

