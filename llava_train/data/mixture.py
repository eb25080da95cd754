"""Data sources and their weighted, deterministic mixing.

A source is a named set of shards with a sampling weight (LLaVA-OneVision's data YAMLs
list such sources). Mixing happens inside each logical stream (see shards.py): draw k of
stream s picks its source from a generator seeded by (seed, s, k) alone, so the choice
is the same on any number of ranks and after any resume, and the only state it needs
is the draw counter.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    urls: tuple[str, ...]
    weight: float = 1.0

    def __post_init__(self):
        if not self.urls:
            raise ValueError(f"data source {self.name!r} has no shards; check its paths")
        if not self.weight > 0:
            raise ValueError(f"data source {self.name!r} has weight {self.weight}; weights must be positive")


def as_sources(urls_or_sources) -> list[Source]:
    """A plain list of shard paths is one source named `train`."""
    items = list(urls_or_sources)
    if items and all(isinstance(item, Source) for item in items):
        names = [s.name for s in items]
        if len(set(names)) != len(names):
            raise ValueError(f"data source names must be unique, got {names}")
        return items
    if any(isinstance(item, Source) for item in items):
        raise ValueError("give either shard paths or Sources, not both")
    return [Source("train", tuple(str(u) for u in items))]


class SourceChooser:
    """Which source each draw of a logical stream reads from, in proportion to the weights."""

    def __init__(self, sources: list[Source], seed: int):
        self.seed = seed
        self.cumulative = list(itertools.accumulate(s.weight for s in sources))

    def __call__(self, stream: int, draw: int) -> int:
        point = rng(self.seed, "mixture", stream, draw).random() * self.cumulative[-1]
        return min(bisect.bisect_right(self.cumulative, point), len(self.cumulative) - 1)


def rng(*parts) -> random.Random:
    """A generator seeded by a stable hash (Python's hash() of strings changes per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))
