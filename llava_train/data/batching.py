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

Lengths are taken at the micro-batch's visual token count (`Example.len_at`). A group (the
members of a preference pair, handed in as one list) is one unit everywhere: it counts as
one sample, its members are consecutive rows of one micro-batch, and packing puts them in
one row or refuses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llava_train.data.batch import Example

Row = list[Example]
MicroBatch = list[Row]
Unit = list[Example]  # one sample, or the members of one group, never split


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
    examples: list, cfg: BatchingConfig, rng: random.Random, tokens_per_image: int | None = None
) -> list[MicroBatch]:
    """`examples`: Examples and groups (lists of Examples); lengths at `tokens_per_image` per compact image span."""
    n, units = tokens_per_image, as_units(examples)
    if cfg.packing:
        batches = _split([[row] for row in pack_rows(units, cfg.max_tokens_per_row, n)], cfg, n)
    elif cfg.group_by_modality_length:
        batches = _grouped(units, cfg, n)
    else:
        batches = _split([_rows(unit) for unit in units], cfg, n)
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
    left, planned, out, at = as_units(examples), [], [], object()
    while left:
        budget = budget_of(len(out))
        if budget != at:
            planned, at = plan(left, cfg, rng, tokens_of(budget)), budget
        batch = planned.pop(0)
        out.append(PlannedBatch(batch, budget, tokens_of(budget)))
        taken = {id(e) for row in batch for e in row}
        left = [unit for unit in left if id(unit[0]) not in taken]  # stream order is kept for a re-plan
    return out


def as_units(examples: list) -> list[Unit]:
    return [list(e) if isinstance(e, (list, tuple)) else [e] for e in examples]


def unit_length(unit: Unit, tokens_per_image: int | None = None) -> int:
    return sum(e.len_at(tokens_per_image) for e in unit)


def pack_rows(examples: list, capacity: int, tokens_per_image: int | None = None) -> list[Row]:
    """First-fit decreasing: longest sample first, each into the first row with room (ties keep stream order).
    A group goes into one row, whole."""
    rows: list[Row] = []
    room: list[int] = []
    units = as_units(examples)
    for unit in sorted(units, key=lambda u: unit_length(u, tokens_per_image), reverse=True):  # sorted() is stable
        size = unit_length(unit, tokens_per_image)
        if len(unit) > 1 and size > capacity:
            raise ValueError(
                f"group {unit[0].group!r} ({len(unit)} members, {size} tokens) does not fit in one packed row of "
                f"max_tokens_per_row={capacity}; packing keeps a group's members in one row: raise "
                f"data.max_tokens_per_row (to {len(unit)} x max_length to be safe) or set data.packing: false"
            )
        at = next((i for i, free in enumerate(room) if free >= size), None)
        if at is None:  # a sample longer than a row gets a row of its own
            rows.append(list(unit))
            room.append(capacity - size)
        else:
            rows[at] += unit
            room[at] -= size
    return rows


def row_length(row: Row, tokens_per_image: int | None = None) -> int:
    return sum(e.len_at(tokens_per_image) for e in row)


def _rows(unit: Unit) -> list[Row]:
    """A unit unpacked: each member a row of its own (they stay in one micro-batch)."""
    return [[e] for e in unit]


def _grouped(units: list[Unit], cfg: BatchingConfig, n: int | None) -> list[MicroBatch]:
    def longest(unit: Unit) -> int:
        return max(e.len_at(n) for e in unit)

    def has_images(unit: Unit) -> bool:
        return any(e.has_images for e in unit)

    modalities = [[u for u in units if has_images(u)], [u for u in units if not has_images(u)]]
    blocks = [[_rows(u) for u in sorted(group, key=longest, reverse=True)] for group in modalities]
    if cfg.max_tokens_per_batch is not None:
        return [batch for group in blocks for batch in _split(group, cfg, n)]
    size = cfg.micro_batch_size
    whole = [len(group) - len(group) % size for group in blocks]
    leftovers = [block for group, k in zip(blocks, whole) for block in group[k:]]
    full = [batch for group, k in zip(blocks, whole) for batch in _split(group[:k], cfg, n)]
    return full + _split(leftovers, cfg, n)


def _split(blocks: list[list[Row]], cfg: BatchingConfig, n: int | None) -> list[MicroBatch]:
    """Consecutive blocks (the rows of one unit, or one packed row) into micro-batches: `micro_batch_size`
    blocks each, or by padded tokens under the budget. A block is never split."""
    if cfg.max_tokens_per_batch is None:
        size = cfg.micro_batch_size
        return [[row for block in blocks[i : i + size] for row in block] for i in range(0, len(blocks), size)]
    batches: list[MicroBatch] = []
    current: MicroBatch = []
    longest = 0
    for block in blocks:
        own = max(row_length(row, n) for row in block)
        if len(block) > 1 and len(block) * own > cfg.max_tokens_per_batch:
            raise ValueError(
                f"group {block[0][0].group!r} needs {len(block)} rows x {own} tokens, more than "
                f"max_tokens_per_batch={cfg.max_tokens_per_batch}; a group stays in one micro-batch: raise "
                "data.max_tokens_per_batch or lower max_length"
            )
        length = max(longest, own)
        if current and (len(current) + len(block)) * length > cfg.max_tokens_per_batch:
            batches.append(current)
            current, length = [], own
        current += block
        longest = length
    if current:
        batches.append(current)
    return batches
