"""Bookkeeping of skipped samples: counts per reason, rate-limited warnings, and a limit on the bad fraction.

One bad sample never stops a run, but a run where a large part of the data is bad is
almost always a broken conversion or a wrong image root: better to stop early and say so
than to train for days on the remaining few percent.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("llava_train.data")

MIN_SAMPLES_FOR_LIMIT = 200  # below this the fraction is noise (one bad shard among the first few)
EXAMPLE_KEYS = 5  # bad sample keys quoted in the error


class TooMuchBadData(RuntimeError):
    """More than data.max_bad_fraction of the samples read so far were unusable."""


class SkipLog:
    """Counts good and skipped samples of one reader and enforces `max_bad_fraction` (None = no limit)."""

    def __init__(self, max_bad_fraction: float | None = None, burst: int = 20, interval_s: float = 10.0):
        self.max_bad_fraction = max_bad_fraction
        self.skipped: Counter = Counter()
        self.good = 0
        self.examples: list[str] = []  # the first few bad keys, with their reasons
        self._warnings = RateLimiter(burst, interval_s)

    @property
    def seen(self) -> int:
        return self.good + sum(self.skipped.values())

    def ok(self) -> None:
        self.good += 1
        self._check()

    def skip(self, reason: str, key: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < EXAMPLE_KEYS:
            self.examples.append(f"{key} ({reason})")
        suppressed = self._warnings.allow()
        if suppressed is not None:
            more = f" ({suppressed} skips since the last warning not shown)" if suppressed else ""
            log.warning("skipping sample %s: %s%s", key, detail, more)
        self._check()

    def _check(self) -> None:
        limit, seen = self.max_bad_fraction, self.seen
        if limit is None or seen < MIN_SAMPLES_FOR_LIMIT:
            return
        bad = seen - self.good
        if bad > limit * seen:
            raise TooMuchBadData(
                f"{bad} of the {seen} samples read so far ({bad / seen:.1%}) were skipped, more than "
                f"data.max_bad_fraction={limit}. Reasons: {dict(self.skipped)}. For example: "
                f"{', '.join(self.examples)}. Check the shards (`llava-train data inspect DIR`) and the image "
                "root or template they were converted with, or raise data.max_bad_fraction (1.0 = never stop)."
            )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"good": self.good, "skipped": dict(self.skipped), "examples": list(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.good = int(state.get("good", 0))
        self.skipped = Counter(state.get("skipped", {}))
        self.examples = list(state.get("examples", []))


class RateLimiter:
    """`burst` messages freely, then at most one per `interval_s`. `allow()` returns None to stay
    quiet, else how many messages were suppressed since the last one that went out."""

    def __init__(self, burst: int, interval_s: float):
        self.burst, self.interval_s = burst, interval_s
        self.sent, self.suppressed, self.last = 0, 0, float("-inf")

    def allow(self) -> int | None:
        now = time.monotonic()
        if self.sent >= self.burst and now - self.last < self.interval_s:
            self.suppressed += 1
            return None
        suppressed, self.suppressed = self.suppressed, 0
        self.sent, self.last = self.sent + 1, now
        return suppressed
