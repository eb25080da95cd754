"""How a window of upcoming samples becomes micro-batches: grouping, token budgets, packing.

A plan is a list of micro-batches; a micro-batch is a list of rows; a row is a list of
Examples (one, or several when packing). Planning is a pure function of the window's
samples and a seeded generator, so re-reading the same window after a resume gives the
same plan (batch_stream.py relies on this).

- plain: `micro_batch_size` samples per micro-batch, in stream order (the order that is
  the same at any world size).
- `group_by_modality_length` (LLaVA's group_by_modality_length): image samples with image
  samples and text-only with text-only, each sorted by length, so a micro-batch pads to
  similar lengths and text-only micro-batches skip most of the vision work; the mixed
  leftovers form one last micro-batch; micro-batch order is then shuffled.
- `max_tokens_per_batch`: a micro-batch holds as many rows as fit with rows x longest row
  <= the budget (padding counts: it costs compute), instead of a fixed count.
- `packing`: samples are packed first-fit-decreasing into rows of `max_tokens_per_row`,
  then rows form micro-batches (`micro_batch_size` rows, or by the token budget).

Lengths are taken at the micro-batch's visual token count (`Example.len_at`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llava_train.data.batch import Example

Row = list[Example]
MicroBatch = list[Row]


@dataclass(frozen=True)
class BatchingConfig:
    micro_batch_size: int  # samples per micro-batch, or rows when packing; unused with a token budget
    max_tokens_per_batch: int | None = None
    group_by_modality_length: bool = False
    packing: bool = False
    max_tokens_per_row: int = 2048  # row capacity when packing
    window: int = 256  # samples planned together when grouping, packing or budgeting

    @property
    def reorders(self) -> bool:
        return self.group_by_modality_length or self.packing or self.max_tokens_per_batch is not None

    @property
    def window_size(self) -> int:
        """Samples read per plan. Plain batching plans one micro-batch at a time; otherwise the window
        is rounded up to a multiple of micro_batch_size, so count-based grouping leaves no short batch."""
        if not self.reorders:
            return self.micro_batch_size
        return -(-self.window // self.micro_batch_size) * self.micro_batch_size


def plan(
    examples: list[Example], cfg: BatchingConfig, rng: random.Random, tokens_per_image: int | None = None
) -> list[MicroBatch]:
    """Lengths at `tokens_per_image` per compact image span."""
    n = tokens_per_image
    if cfg.packing:
        batches = _split(pack_rows(examples, cfg.max_tokens_per_row, n), cfg, n)
    elif cfg.group_by_modality_length:
        batches = _grouped(examples, cfg, n)
    else:
        batches = _split([[e] for e in examples], cfg, n)
    if cfg.packing or cfg.group_by_modality_length:
        rng.shuffle(batches)  # otherwise the longest (and all image) micro-batches would always come first
    return batches


class PlannedBatch(list):
    """A micro-batch (a list of rows) and the visual budget it was planned for."""

    def __init__(self, rows: MicroBatch, visual_budget: int | None = None, tokens_per_image: int | None = None):
        super().__init__(rows)
        self.visual_budget, self.tokens_per_image = visual_budget, tokens_per_image


def plan_window(examples: list, cfg: BatchingConfig, rng: random.Random, budget_of, tokens_of) -> list[PlannedBatch]:
    """Plan a window whose micro-batch i is trained at visual budget `budget_of(i)` (`tokens_of(budget)` tokens
    per image). The window is planned at the first micro-batch's budget, and the samples still left are planned
    again whenever the next budget differs, so each micro-batch is sized for its own budget, and a fixed budget
    gives exactly `plan`."""
    left, planned, out, at = list(examples), [], [], object()
    while left:
        budget = budget_of(len(out))
        if budget != at:
            planned, at = plan(left, cfg, rng, tokens_of(budget)), budget
        batch = planned.pop(0)
        out.append(PlannedBatch(batch, budget, tokens_of(budget)))
        taken = {id(e) for row in batch for e in row}
        left = [e for e in left if id(e) not in taken]  # stream order is kept for a re-plan
    return out


def pack_rows(examples: list[Example], capacity: int, tokens_per_image: int | None = None) -> list[Row]:
    """First-fit decreasing: longest sample first, each into the first row with room (ties keep stream order)."""
    rows: list[Row] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: e.len_at(tokens_per_image), reverse=True):  # sorted() is stable
        size = example.len_at(tokens_per_image)
        at = next((i for i, free in enumerate(room) if free >= size), None)
        if at is None:  # a sample longer than a row gets a row of its own
            rows.append([example])
            room.append(capacity - size)
        else:
            rows[at].append(example)
            room[at] -= size
    return rows


def row_length(row: Row, tokens_per_image: int | None = None) -> int:
    return sum(e.len_at(tokens_per_image) for e in row)


def _grouped(examples: list[Example], cfg: BatchingConfig, n: int | None) -> list[MicroBatch]:
    groups = [[e for e in examples if e.has_images], [e for e in examples if not e.has_images]]
    rows = [[[e] for e in sorted(group, key=lambda e: e.len_at(n), reverse=True)] for group in groups]
    if cfg.max_tokens_per_batch is not None:
        return [batch for group in rows for batch in _split(group, cfg, n)]
    size = cfg.micro_batch_size
    whole = [len(group) - len(group) % size for group in rows]
    leftovers = [row for group, k in zip(rows, whole) for row in group[k:]]
    full = [batch for group, k in zip(rows, whole) for batch in _split(group[:k], cfg, n)]
    return full + _split(leftovers, cfg, n)


def _split(rows: list[Row], cfg: BatchingConfig, n: int | None) -> list[MicroBatch]:
    """Consecutive rows into micro-batches: by count, or by padded tokens under the budget."""
    if cfg.max_tokens_per_batch is None:
        size = cfg.micro_batch_size
        return [rows[i : i + size] for i in range(0, len(rows), size)]
    batches: list[MicroBatch] = []
    current: MicroBatch = []
    longest = 0
    for row in rows:
        length = max(longest, row_length(row, n))
        if current and (len(current) + 1) * length > cfg.max_tokens_per_batch:
            batches.append(current)
            current, length = [], row_length(row, n)
        current.append(row)
        longest = length
    if current:
        batches.append(current)
    return batches
