"""Micro-batches planned over windows of a ShardStream, with an exact resume state.

The stream is read a window at a time; each window is planned into micro-batches
(batching.py) and they are handed out one by one. The state never holds samples: it is
the stream's position at the start of the current window plus how many of its
micro-batches went out. A resume re-reads that one window (at most `window` samples, not
the epoch), plans it again — the plan is a pure function of the window and a seed — and
skips what was already handed out. Once a window is used up, the state is simply the
stream's position after it, so plain batching (a window of one micro-batch) never
re-reads anything.

With a connector whose visual token count varies (`VisualBudgets`), each micro-batch is
planned for the budget of the step it will be consumed at. That step is known here: the
loader hands out its workers' micro-batches round-robin, so this reader's j-th micro-batch
is the rank's (j * workers + worker)-th, of step that // grad_accum. The state keeps j at the
window start, so a resume plans the window again with the same budgets.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from llava_train.data.batching import BatchingConfig, PlannedBatch, plan_window
from llava_train.data.mixture import rng
from llava_train.data.shards import ShardStream
from llava_train.data.visual_tokens import VisualTokens


@dataclass(frozen=True)
class VisualBudgets:
    """The visual budget of each micro-batch of a rank: the one drawn for the step it is consumed at."""

    tokens: VisualTokens  # the connector's spec
    grad_accum: int = 1  # micro-batches per step on a rank
    draw: bool = True  # False (evaluation): every micro-batch at budget None, the connector's full count

    def at(self, index: int, seed: int, rank: int) -> int | None:
        """Budget of the rank's `index`-th micro-batch."""
        return self.tokens.budget_for(seed, index // self.grad_accum, rank) if self.draw else None


class BatchStream(IterableDataset):
    """Yields micro-batches (PlannedBatch: lists of rows of Examples, with their visual budget);
    use with `build_loader(..., batch_size=None)`."""

    def __init__(self, source: ShardStream, cfg: BatchingConfig, budgets: VisualBudgets | None = None):
        self.source, self.cfg, self.budgets = source, cfg, budgets
        self.taken: Counter = Counter()  # samples handed out per data source
        # Skips counted when the resumed state was saved: the source restarts at its window's start
        # and counts that window's skips again while replaying it, so until then it reports fewer.
        self._skipped_at_resume: Counter = Counter()
        # Where a resume would start: (stream state at a window start, window index, micro-batches of it done,
        # micro-batches this reader handed out before the window).
        self._resume_at: tuple[dict, int, int, int] | None = None
        self._pending: dict | None = None

    # the loader checks the worker split against these
    @property
    def num_streams(self) -> int:
        return self.source.num_streams

    @property
    def world_size(self) -> int:
        return self.source.world_size

    @property
    def skipped(self) -> Counter:
        return self.source.skipped | self._skipped_at_resume  # per reason, the larger

    def __iter__(self) -> Iterator[PlannedBatch]:
        state, self._pending = self._pending, None
        index, skip = (state["window"], state["emitted"]) if state else (0, 0)
        served = state.get("served", 0) if state else 0
        self.taken = Counter(state["counters"]["sources"]) if state else Counter()
        self._skipped_at_resume = Counter(state["counters"]["skipped"]) if state else Counter()
        samples = iter(self.source)  # applies the stream state that load_state_dict handed on
        self._resume_at = (self.source.state_dict(), index, skip, served)
        return self._batches(samples, index, skip, served)

    def _batches(self, samples: Iterator, index: int, skip: int, served: int) -> Iterator[PlannedBatch]:
        streams = tuple(self.source.local_streams())
        while True:
            start = self.source.state_dict()
            examples = list(islice(samples, self.cfg.window_size))
            if not examples:
                return
            batches = plan_window(
                examples, self.cfg, rng(self.source.seed, "batches", streams, index),
                lambda i, first=served: self._budget(first + i), self._tokens,
            )
            for done in range(skip + 1, len(batches) + 1):
                # Set before the yield: the loader snapshots the state while we are suspended.
                if done < len(batches):
                    self._resume_at = (start, index, done, served)
                else:  # the window is used up: a resume continues after it, re-reading nothing
                    self._resume_at = (self.source.state_dict(), index + 1, 0, served + len(batches))
                batch = batches[done - 1]
                self.taken.update(e.source for row in batch for e in row)
                yield batch
            index, skip, served = index + 1, 0, served + len(batches)

    def _budget(self, served: int) -> int | None:
        """Budget of this reader's `served`-th micro-batch (the loader takes its workers' batches in turn)."""
        if self.budgets is None:
            return None
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.budgets.at(served * workers + worker, self.source.seed, self.source.rank)

    def _tokens(self, budget: int | None) -> int | None:
        return None if self.budgets is None else self.budgets.tokens.num_tokens(budget)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        if self._pending is not None:
            return copy.deepcopy(self._pending)
        source, index, emitted, served = self._resume_at or (self.source.state_dict(), 0, 0, 0)
        return {
            "batching": {**asdict(self.cfg), **self._budget_setup()},
            "source": copy.deepcopy(source),
            "window": index,
            "emitted": emitted,
            "served": served,
            "counters": {"skipped": dict(self.skipped), "sources": dict(self.taken)},
        }

    def _budget_setup(self) -> dict:
        """What the budgets depend on; only for a connector whose count varies (else the state is as before)."""
        if self.budgets is None or not self.budgets.tokens.varies:
            return {}
        spec = {k: v for k, v in asdict(self.budgets.tokens).items() if k != "average" or v}  # older states lack it
        return {"visual_tokens": spec, "grad_accum": self.budgets.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        mine = {**asdict(self.cfg), **self._budget_setup()}
        for key, value in mine.items():
            saved = state["batching"].get(key)
            if saved != value:
                raise ValueError(
                    f"the data loader state was saved with batching {key}={saved}, but this run has {key}={value}; "
                    "resume with the same data batching settings (micro_batch_size, max_tokens_per_batch, "
                    "group_by_modality_length, packing, max_tokens_per_row, batching_window), connector budgets "
                    "and train.grad_accum"
                )
        self.source.load_state_dict(state["source"])  # checks the shards/ranks now, applies on iteration
        self._pending = copy.deepcopy(state)
        self.taken = Counter(state["counters"]["sources"])


def loader_counters(loader) -> dict[str, Counter]:
    """{"skipped": per reason, "sources": samples handed out per source}, summed over the loader's workers.

    Without workers the dataset in this process is the one reading; with workers it is an
    unused copy, and the workers' counts travel in the loader state."""
    if loader.num_workers == 0:
        dataset = loader.dataset
        return {"skipped": Counter(dataset.skipped), "sources": Counter(dataset.taken)}
    total = {"skipped": Counter(), "sources": Counter()}
    _collect(loader.state_dict(), total)
    return total


def _collect(node, total: dict[str, Counter]) -> None:
    if isinstance(node, dict):
        if "counters" in node:
            for name, counts in node["counters"].items():
                total[name].update(counts)
            return
        for value in node.values():
            _collect(value, total)
