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


def plan(examples: list[Example], cfg: BatchingConfig, rng: random.Random) -> list[MicroBatch]:
    if cfg.packing:
        batches = _split(pack_rows(examples, cfg.max_tokens_per_row), cfg)
    elif cfg.group_by_modality_length:
        batches = _grouped(examples, cfg)
    else:
        batches = _split([[e] for e in examples], cfg)
    if cfg.packing or cfg.group_by_modality_length:
        rng.shuffle(batches)  # otherwise the longest (and all image) micro-batches would always come first
    return batches


def pack_rows(examples: list[Example], capacity: int) -> list[Row]:
    """First-fit decreasing: longest sample first, each into the first row with room (ties keep stream order)."""
    rows: list[Row] = []
    room: list[int] = []
    for example in sorted(examples, key=len, reverse=True):  # sorted() is stable
        size = len(example)
        at = next((i for i, free in enumerate(room) if free >= size), None)
        if at is None:  # a sample longer than a row gets a row of its own
            rows.append([example])
            room.append(capacity - size)
        else:
            rows[at].append(example)
            room[at] -= size
    return rows


def row_length(row: Row) -> int:
    return sum(len(e) for e in row)


def _grouped(examples: list[Example], cfg: BatchingConfig) -> list[MicroBatch]:
    groups = [[e for e in examples if e.has_images], [e for e in examples if not e.has_images]]
    rows = [[[e] for e in sorted(group, key=len, reverse=True)] for group in groups]
    if cfg.max_tokens_per_batch is not None:
        return [batch for group in rows for batch in _split(group, cfg)]
    size = cfg.micro_batch_size
    whole = [len(group) - len(group) % size for group in rows]
    leftovers = [row for group, n in zip(rows, whole) for row in group[n:]]
    full = [batch for group, n in zip(rows, whole) for batch in _split(group[:n], cfg)]
    return full + _split(leftovers, cfg)


def _split(rows: list[Row], cfg: BatchingConfig) -> list[MicroBatch]:
    """Consecutive rows into micro-batches: by count, or by padded tokens under the budget."""
    if cfg.max_tokens_per_batch is None:
        size = cfg.micro_batch_size
        return [rows[i : i + size] for i in range(0, len(rows), size)]
    batches: list[MicroBatch] = []
    current: MicroBatch = []
    longest = 0
    for row in rows:
        length = max(longest, row_length(row))
        if current and (len(current) + 1) * length > cfg.max_tokens_per_batch:
            batches.append(current)
            current, length = [], row_length(row)
        current.append(row)
        longest = length
    if current:
        batches.append(current)
    return batches
