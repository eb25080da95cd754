"""The machinery every converter shares: rows -> worker processes -> ordered shards + summary.

A converter supplies a source (rows by index) and a RecordFormat (one row -> a record and
its images). Worker processes convert spans of consecutive rows; `Pool.imap` hands the
spans back in input order, so the shards depend only on the input and the shard limits,
never on the number of workers or on timing. Tar keys are input row numbers, so a key in
a shard points straight back at its source row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import json
import multiprocessing
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_tools.convert_records import ImageLoader, record_members
from data_tools.shard_writer import MIN_SHARD_BYTES, ShardSink
from data_tools.token_count import DEFAULT_TEMPLATE, TokenCounter
from llava_train.data.errors import BadSample

SUMMARY_FILE = "summary.json"
EXAMPLES_PER_REASON = 5


@dataclass
class ConvertOptions:
    out_dir: str | Path
    image_root: str | Path | None = None
    workers: int = 1
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    max_image_size: int | None = None
    tokenizer: str | Path | None = None
    template: str = DEFAULT_TEMPLATE
    prefix: str = "shard"
    progress: bool = True

    def check(self) -> None:
        """Fail on a bad option before any work starts, naming the option and the fix."""
        for name, flag in [("workers", "--workers"), ("samples_per_shard", "--samples-per-shard")]:
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.max_shard_bytes < MIN_SHARD_BYTES:
            raise ValueError(f"--max-shard-bytes must be at least {MIN_SHARD_BYTES}, got {self.max_shard_bytes}")
        if self.max_image_size is not None and self.max_image_size < 1:
            raise ValueError(f"--max-image-size must be a positive number of pixels, got {self.max_image_size}")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise FileNotFoundError(f"--image-root {str(self.image_root)!r} is not a folder; pass the image folder")


class RecordFormat(ABC):
    """One input format: how a row becomes a shard record. Subclasses must be picklable
    (they travel to the worker processes)."""

    id_field = "id"

    def key(self, row, index: int) -> str:
        """The sample id: the row's own id, else its position."""
        value = row.get(self.id_field) if isinstance(row, dict) else None
        return str(value) if value is not None else f"row-{index:09d}"

    @abstractmethod
    def convert(self, row, index: int, load_image: ImageLoader) -> tuple[dict, list[tuple[str, bytes]]]:
        """(record without its "images" field, [(ext, bytes)] per image); BadSample to skip."""


class ListSource:
    """Rows held in a Python list (a parsed JSON file)."""

    def __init__(self, rows: list):
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, start: int, stop: int) -> list:
        return self._rows[start:stop]


# ----------------------------------------------------------------------------- workers


@dataclass
class _Written:
    members: list[tuple[str, bytes]]
    num_images: int
    lengths: list[int]


@dataclass
class _Skipped:
    reason: str
    key: str
    detail: str


@dataclass
class _Job:
    source: object
    fmt: RecordFormat
    options: ConvertOptions


class _Worker:
    """Converts spans of rows; one per process (the tokenizer is loaded once per process)."""

    def __init__(self, job: _Job):
        self.job = job
        options = job.options
        self.load_image = ImageLoader(options.image_root, options.max_image_size)
        self.counter = TokenCounter(options.tokenizer, options.template) if options.tokenizer else None

    def run(self, span: tuple[int, int]) -> list:
        start, stop = span
        rows = self.job.source.rows(start, stop)
        return [self._one(row, index) for index, row in zip(range(start, stop), rows)]

    def _one(self, row, index: int):
        key = self.job.fmt.key(row, index)
        try:
            if isinstance(row, BadSample):  # a line the reader could not parse
                raise row
            record, images = self.job.fmt.convert(row, index, self.load_image)
            lengths = self.counter.lengths(record) if self.counter else []
            return _Written(record_members(f"{index:09d}", record, images), len(images), lengths)
        except BadSample as bad:
            return _Skipped(bad.reason, key, bad.detail)
        except Exception as err:  # a malformed row must not end a run over millions of rows
            return _Skipped("unexpected error", key, f"{type(err).__name__}: {err}")


_WORKER: _Worker | None = None  # the per-process worker inside the pool


def _init_pool_worker(job: _Job) -> None:
    global _WORKER
    _WORKER = _Worker(job)


def _run_span(span: tuple[int, int]) -> list:
    return _WORKER.run(span)


@contextmanager
def _converted(job: _Job, total: int) -> Iterator[Iterator[list]]:
    """An iterator over spans of rows, giving each span's results in input order."""
    workers = job.options.workers
    # Enough spans to keep every worker busy, small enough that progress moves smoothly.
    span = max(1, min(64, total // (workers * 8)))
    spans = [(start, min(start + span, total)) for start in range(0, total, span)]
    if workers == 1:
        yield map(_Worker(job).run, spans)
        return
    with multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=(job,)) as pool:
        yield pool.imap(_run_span, spans)


# ----------------------------------------------------------------------------- run


def run_conversion(source, fmt: RecordFormat, options: ConvertOptions, input_name: str) -> dict:
    """Convert every row of `source`; write shards, index.json and summary.json into
    options.out_dir; return the summary."""
    options.check()
    if options.tokenizer is not None:
        # Fail here, once, with the message: a pool worker whose initializer raises is restarted forever.
        TokenCounter(options.tokenizer, options.template)
    started = time.perf_counter()
    tally = _Tally()
    sink = ShardSink(Path(options.out_dir), options.prefix, options.samples_per_shard, options.max_shard_bytes)
    job = _Job(source, fmt, options)
    # The pool forks before the progress bar starts its monitor thread: a fork copies no other thread.
    with _converted(job, len(source)) as converted, tqdm(
        total=len(source), unit=" samples", desc="convert", disable=not options.progress
    ) as bar:
        for results in converted:
            for result in results:
                if isinstance(result, _Written):
                    sink.add(result.members)
                tally.add(result)
            bar.update(len(results))
    shards = sink.close()
    seconds = time.perf_counter() - started
    summary = tally.summary(input_name, options, shards, seconds)
    (Path(options.out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


class _Tally:
    def __init__(self):
        self.written = self.images = 0
        self.lengths: list[int] = []
        self.skipped: dict[str, dict] = {}

    def add(self, result) -> None:
        if isinstance(result, _Written):
            self.written += 1
            self.images += result.num_images
            self.lengths += result.lengths
            return
        entry = self.skipped.setdefault(result.reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append({"key": result.key, "detail": result.detail})

    def summary(self, input_name: str, options: ConvertOptions, shards: list[dict], seconds: float) -> dict:
        out_dir = Path(options.out_dir)
        tokens = None
        if options.tokenizer is not None and self.lengths:
            tokens = {
                "template": options.template,
                "total": sum(self.lengths),
                "mean": round(statistics.fmean(self.lengths), 1),
                "max": max(self.lengths),
            }
        return {
            "input": input_name,
            "out_dir": str(out_dir),
            "written": self.written,
            "skipped": self.skipped_total(),
            "skip_reasons": dict(sorted(self.skipped.items())),
            "images": self.images,
            "shards": len(shards),
            "bytes": sum((out_dir / shard["name"]).stat().st_size for shard in shards),
            "tokens": tokens,
            "workers": options.workers,
            "seconds": round(seconds, 3),
            "rows_per_second": round((self.written + self.skipped_total()) / max(seconds, 1e-9), 1),
        }

    def skipped_total(self) -> int:
        return sum(entry["count"] for entry in self.skipped.values())


def format_summary(summary: dict) -> str:
    """The summary as a few human-readable lines."""
    lines = [
        f"wrote {summary['written']} samples ({summary['images']} images) to {summary['shards']} shards, "
        f"{summary['bytes'] / 1e6:.1f} MB, in {summary['out_dir']}",
        f"{summary['rows_per_second']} input rows/s with {summary['workers']} worker(s), {summary['seconds']} s",
    ]
    if summary["tokens"]:
        tokens = summary["tokens"]
        lines.append(
            f"text tokens ({tokens['template']} template, image tokens excluded): total {tokens['total']}, "
            f"mean {tokens['mean']}, max {tokens['max']}"
        )
    lines.append(f"skipped {summary['skipped']}" + (":" if summary["skipped"] else ""))
    for reason, entry in summary["skip_reasons"].items():
        lines.append(f"  {reason}: {entry['count']}")
        lines += [f"    {example['key']}: {example['detail']}" for example in entry["examples"]]
    return "\n".join(lines)

