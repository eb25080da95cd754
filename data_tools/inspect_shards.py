"""What is in a set of shards: counts, image sizes, length histogram, modality mix, damage.

Reads every sample once through the training reader (ShardStream) and finds its conversation and
images as the training encoder does (raw_sample.py), so a sample training would skip is reported
here under the same reason, with example keys. Image members that no record uses are listed.
Images are measured from their headers, not decoded.
"""

from __future__ import annotations

import io
import statistics
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image

from data_tools.token_count import DEFAULT_TEMPLATE, TokenCounter
from llava_train.data.errors import BadSample
from llava_train.data.raw_sample import image_members, sample_parts
from llava_train.data.shards import ShardStream, expand_urls

BAR_WIDTH = 40
EXAMPLES = 5  # keys shown per skip reason and of unused image members


@dataclass
class ShardReport:
    shards: int
    length_unit: str  # "tokens" or "words"
    samples: int = 0
    kinds: Counter = field(default_factory=Counter)  # conversation / caption / preference pair
    modality: Counter = field(default_factory=Counter)  # text-only / single-image / multi-image
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    skip_examples: dict = field(default_factory=dict)  # reason -> the first "shard/key: detail"s
    unused_images: list[str] = field(default_factory=list)  # "shard/key.ext" of image members no record uses

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
        if self.unused_images:
            lines.append(f"image members no record uses: {len(self.unused_images)}")
            lines += [f"  {name}" for name in self.unused_images[:EXAMPLES]]
        skipped = sum(self.skipped.values())
        lines.append(f"skipped or unreadable (training skips these too): {skipped}")
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {count}")
            lines += [f"    {example}" for example in self.skip_examples.get(reason, [])]
        return "\n".join(lines)


def inspect(patterns: list[str] | str, tokenizer: str | Path | None = None, template: str = DEFAULT_TEMPLATE):
    """A ShardReport for the shards matched by `patterns` (folders, globs, brace patterns).
    Lengths are template tokens (image tokens excluded) with a tokenizer, else words."""
    urls = expand_urls(patterns)
    counter = TokenCounter(tokenizer, template) if tokenizer is not None else None
    report = ShardReport(shards=len(urls), length_unit="tokens" if counter else "words")
    measure = partial(_measure, counter=counter, unused=report.unused_images)
    stream = _ExampleKeeper(urls, measure, shuffle=False, num_streams=1, loop=False)
    for sample in stream:
        report.samples += 1
        report.kinds[sample["kind"]] += 1
        report.modality[_modality(len(sample["sizes"]))] += 1
        report.widths += [w for w, _ in sample["sizes"]]
        report.heights += [h for _, h in sample["sizes"]]
        report.lengths += sample["lengths"]
    report.skipped = dict(stream.skipped)
    report.skip_examples = stream.examples
    return report


class _ExampleKeeper(ShardStream):
    """The training reader, also keeping the first few keys and details of each skip reason."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.examples: dict[str, list[str]] = {}

    def _skip(self, reason: str, key: str, detail: str) -> None:
        super()._skip(reason, key, detail)
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append(f"{key}: {detail}")


def _measure(raw: dict, counter: TokenCounter | None, unused: list[str]) -> dict:
    record = raw["json"]
    names, left = image_members(raw)
    unused += [f"{raw['__shard__']}/{raw['__key__']}.{ext}" for ext in left]  # also when the sample is skipped
    if "conversations" not in record and all(isinstance(record.get(n), str) for n in ("prompt", "chosen", "rejected")):
        kind = "preference pair"
    else:  # what the training encoder reads: a conversation or a caption, checked against its images
        parts = sample_parts(raw)
        kind, record = parts.kind, {"conversations": parts.conversations}
    sizes = [_image_size(raw, ext) for ext in names]
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
