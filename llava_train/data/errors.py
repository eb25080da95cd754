"""The one exception a data source may raise for a sample it cannot use."""

from __future__ import annotations


class BadSample(Exception):
    """A sample to skip, not a bug to crash on.

    `reason` is a short fixed category ("missing image", "over-long", ...) that the
    stream counts and the trainer logs; `detail` says which sample and why.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)  # both in args, so the exception survives pickling
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason
