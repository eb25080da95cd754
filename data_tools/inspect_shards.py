"""What is in a set of shards: counts, image sizes, length histogram, modality mix, damage.

Reads every sample once through the training reader (ShardStream), so a member the reader
would skip is reported here under the same reason. Images are measured from their headers,
not decoded.
"""

from __future__ import annotations

import io
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data_tools.token_count import DEFAULT_TEMPLATE, TokenCounter
from llava_train.data.errors import BadSample
from llava_train.data.shards import ShardStream, expand_urls

BAR_WIDTH = 40


@dataclass
class ShardReport:
    shards: int
    length_unit: str  # "tokens" or "words"
    samples: int = 0
    kinds: Counter = field(default_factory=Counter)  # conversation / preference pair
    modality: Counter = field(default_factory=Counter)  # text-only / single-image / multi-image
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.widths)

    def __str__(self) -> str:
        lines = [f"{self.samples} samples in {self.shards} shards, {self.images} images"]
        lines.append("kinds: " + _mix(self.kinds, self.samples))
        lines.append("modality: " + _mix(self.modality, self.samples))
        if self.widths:
            lines.append("image size (min / median / max):")
            lines.append(f"  width  {_three(self.widths)}")
            lines.append(f"  height {_three(self.heights)}")
        if self.lengths:
            lines.append(
                f"length in {self.length_unit}: mean {statistics.fmean(self.lengths):.1f}, "
                f"median {statistics.median(self.lengths):g}, p95 {_percentile(self.lengths, 95)}, "
                f"max {max(self.lengths)}"
            )
            lines += histogram_lines(self.lengths)
        skipped = sum(self.skipped.values())
        lines.append(f"skipped or unreadable: {skipped}")
        lines += [f"  {reason}: {count}" for reason, count in sorted(self.skipped.items())]
        return "\n".join(lines)


def inspect(patterns: list[str] | str, tokenizer: str | Path | None = None, template: str = DEFAULT_TEMPLATE):
    """A ShardReport for the shards matched by `patterns` (folders, globs, brace patterns).
    Lengths are template tokens (image tokens excluded) with a tokenizer, else words."""
    urls = expand_urls(patterns)
    counter = TokenCounter(tokenizer, template) if tokenizer is not None else None
    report = ShardReport(shards=len(urls), length_unit="tokens" if counter else "words")
    stream = ShardStream(urls, lambda raw: _measure(raw, counter), shuffle=False, num_streams=1, loop=False)
    for sample in stream:
        report.samples += 1
        report.kinds[sample["kind"]] += 1
        report.modality[_modality(len(sample["sizes"]))] += 1
        report.widths += [w for w, _ in sample["sizes"]]
        report.heights += [h for _, h in sample["sizes"]]
        report.lengths += sample["lengths"]
    report.skipped = dict(stream.skipped)
    return report


def _measure(raw: dict, counter: TokenCounter | None) -> dict:
    record = raw["json"]
    if "conversations" in record:
        kind = "conversation"
    elif all(isinstance(record.get(name), str) for name in ("prompt", "chosen", "rejected")):
        kind = "preference pair"
    else:
        raise BadSample("missing field", "neither `conversations` nor `prompt`/`chosen`/`rejected`")
    sizes = [_image_size(raw, ext) for ext in record.get("images") or []]
    lengths = counter.lengths(record) if counter else _word_counts(record)
    return {"kind": kind, "sizes": sizes, "lengths": lengths}


def _image_size(raw: dict, ext: str) -> tuple[int, int]:
    if ext not in raw:
        raise BadSample("missing image", f"no tar member .{ext}")
    try:
        return Image.open(io.BytesIO(raw[ext])).size
    except Exception as err:  # PIL raises many types for a bad header
        raise BadSample("undecodable image", f".{ext}: {type(err).__name__}: {err}") from None


def _word_counts(record: dict) -> list[int]:
    if "conversations" in record:
        return [sum(len(str(turn.get("value", turn.get("content", ""))).split()) for turn in record["conversations"])]
    prompt = len(record["prompt"].split())
    return [prompt + len(record[side].split()) for side in ("chosen", "rejected")]


def _modality(num_images: int) -> str:
    return "text-only" if num_images == 0 else "single-image" if num_images == 1 else "multi-image"


def _mix(counts: Counter, total: int) -> str:
    return ", ".join(f"{name} {n} ({100 * n / max(total, 1):.1f}%)" for name, n in counts.most_common()) or "-"


def _three(values: list[int]) -> str:
    return f"{min(values)} / {statistics.median_low(values)} / {max(values)}"


def _percentile(values: list[int], q: int) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, (len(ordered) * q) // 100)]


def histogram_lines(values: list[int]) -> list[str]:
    """Power-of-two bins (1, 2, 3-4, 5-8, ...): lengths span orders of magnitude."""
    bins = Counter(max(0, (v - 1).bit_length()) if v > 0 else -1 for v in values)
    peak = max(bins.values())
    lines = []
    for b in range(min(bins), max(bins) + 1):
        low, high = (0, 0) if b < 0 else (2 ** (b - 1) + 1 if b > 0 else 1, 2**b)
        label = f"{low}" if low == high else f"{low}-{high}"
        bar = "#" * round(BAR_WIDTH * bins[b] / peak)
        lines.append(f"  {label:>13} {bar:<{BAR_WIDTH}} {bins[b]}")
    return lines
