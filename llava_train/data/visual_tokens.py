"""How many visual tokens a connector emits per image, at each visual budget.

A connector answers `visual_tokens()` with this small, model-free, picklable spec, so the
data pipeline (also inside loader workers) can size and expand image placeholders without
the model. A budget is what a step asks the connector for (MQT: how many latent queries;
nested pooling: which grid); `None` asks for its full output. A connector with a fixed
count (`mlp`: one token per patch) offers no budgets.

Each training step draws its budget from (seed, step), or (seed, step, rank) when
`per_rank`, with a stable hash: the same on every run, after any resume, in any process.
With `average`, no draw: every step is planned at the budget with the most tokens, and the
objective's loss is the mean over all budgets, one forward each on the batch re-laid out
(objectives/budget_average.py), so every budget trains on every batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_train.data.mixture import rng


@dataclass(frozen=True)
class VisualTokens:
    full: int  # tokens per image at budget None: the connector's whole output
    budgets: tuple[int, ...] = ()  # the budgets a training step may draw; empty: a fixed count
    tokens: tuple[int, ...] = ()  # tokens per image at each of `budgets`
    per_rank: bool = False  # each rank draws its own budget (else all ranks share the step's)
    average: bool = False  # train every budget on each batch (mean loss) instead of drawing one per step

    def __post_init__(self):
        object.__setattr__(self, "budgets", tuple(self.budgets))
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if len(self.budgets) != len(self.tokens) or len(set(self.budgets)) != len(self.budgets):
            raise ValueError(
                f"visual budgets {self.budgets} need one token count each and no repeats, got tokens {self.tokens}"
            )
        if min((self.full, *self.tokens)) < 1:
            raise ValueError(f"a connector must emit at least one token per image, got {self.full} / {self.tokens}")

    @classmethod
    def fixed(cls, count: int) -> "VisualTokens":
        return cls(full=count)

    @property
    def varies(self) -> bool:
        return bool(self.budgets)

    @property
    def max_tokens(self) -> int:
        """The most tokens any budget emits: what truncation plans for."""
        return max((self.full, *self.tokens))

    @property
    def largest_budget(self) -> int | None:
        return max(self.budgets, key=self.num_tokens) if self.budgets else None

    def num_tokens(self, budget: int | None) -> int:
        if budget is None:
            return self.full
        if budget not in self.budgets:
            offered = f"valid budgets: {list(self.budgets)}" if self.budgets else f"it emits a fixed {self.full}"
            raise ValueError(
                f"visual budget {budget!r} is not one this connector offers ({offered}, or None for its "
                f"full {self.full} tokens per image); check the connector's budget options"
            )
        return self.tokens[self.budgets.index(budget)]

    def budget_for(self, seed: int, step: int, rank: int = 0) -> int | None:
        """The budget training step `step` uses; None for a fixed count."""
        if not self.budgets:
            return None
        if self.average:  # planned for the largest count: re-laid out smaller, every row still fits
            return self.largest_budget
        key = (seed, "visual_budget", step, rank) if self.per_rank else (seed, "visual_budget", step)
        return rng(*key).choice(self.budgets)
