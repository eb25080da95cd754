"""A loss averaged over visual-token budgets: one forward per budget on the same batch.

M3 (Matryoshka multimodal models) trains all nested scales on every batch: the loss is the mean
of the LM losses at 64, 16, 4 and 1 tokens per image, say. A connector asks for this through its
`VisualTokens(average=True)`; `build_objective` then wraps whatever objective the stage names.
The data pipeline plans every step at the largest count (nothing is drawn), and here the batch is
re-laid out for each budget (`collate.relayout`: spans resized, positions and padding redone), so
each forward sees exactly the batch collate makes at that budget. The trainer is unchanged: the
normaliser units (supervised tokens, sequences, pairs) do not depend on the budget, so the mean of
the loss sums, normalised as usual, is the mean of the per-budget losses, and so is its gradient.

Cost: one LM forward and backward per budget (the smaller ones are cheap: their rows are shorter),
and their activations live together until the backward. Evaluation (model.eval()) runs once, at
the batch's own budget.

Invariants (tests/test_matryoshka.py): one budget equals the plain objective; several equal the
mean of separate single-budget runs, loss and gradient.
"""

from __future__ import annotations

from torch import nn

from llava_train.data.collate import relayout
from llava_train.data.visual_tokens import VisualTokens
from llava_train.objectives.base import Objective, ObjectiveOutput


class BudgetAverage(nn.Module):
    """Wraps an objective (its declarations pass through); in training, the mean of its outputs over budgets."""

    def __init__(self, inner: Objective, spec: VisualTokens, pad_token_id: int):
        super().__init__()
        self.inner = inner
        self.spec = spec
        self.pad_token_id = pad_token_id
        self.normaliser = inner.normaliser

    def count(self, batch) -> int:
        return self.inner.count(batch)

    def external_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self.inner.external_parameters(model)

    def forward(self, model: nn.Module, batch) -> ObjectiveOutput:
        if not self.training:
            return self.inner(model, batch)
        tokens = self.spec.num_tokens(batch.visual_budget)
        outs = {
            budget: self.inner(
                model, relayout(batch, tokens, self.spec.num_tokens(budget), budget, self.pad_token_id)
            )
            for budget in self.spec.budgets
        }
        counts = {out.count for out in outs.values()}
        if len(counts) > 1:  # a normaliser that moved with the budget would make the mean wrong
            raise RuntimeError(f"objective units changed with the visual budget: {counts}")
        k = len(outs)
        metrics = _mean([out.metrics for out in outs.values()])
        # This micro-batch's mean loss at each budget (the quality trade-off, visible per step).
        metrics.update({f"loss/budget{b}": float(out.loss_sum.detach()) / max(1, out.count) for b, out in outs.items()})
        return ObjectiveOutput(
            loss_sum=sum(out.loss_sum for out in outs.values()) / k,
            count=counts.pop(),
            aux_losses=_mean([out.aux_losses for out in outs.values()]),
            metrics=metrics,
        )


def _mean(dicts: list[dict]) -> dict:
    """Each name's mean over the dicts (missing counts as zero: a term reported at some budgets only)."""
    names = dict.fromkeys(name for d in dicts for name in d)
    return {name: sum(d[name] for d in dicts if name in d) / len(dicts) for name in names}


def averaged_if_asked(objective: Objective, model: nn.Module, pad_token_id: int) -> Objective | BudgetAverage:
    """The objective, wrapped when the model's connector asks for a loss averaged over its budgets."""
    spec = model.connector.visual_tokens()
    return BudgetAverage(objective, spec, pad_token_id) if spec.average and spec.varies else objective
