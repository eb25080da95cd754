"""Streaming, deterministic, exactly-resumable reading of webdataset tar shards.

The data is split into `num_streams` logical streams, a number fixed by the recipe and
not by the hardware. Shards are laid out in one endless sequence (epoch 0's order,
then epoch 1's, ...; each epoch shuffled by (seed, epoch)) and shard g of that
sequence belongs to stream g % num_streams. A stream reads its shards in turn, each
in a permutation seeded by (seed, epoch, shard name). The global sample order is the
round-robin interleave stream0[0], stream1[0], ..., stream0[1], ...

Rank r of W reads streams r, r+W, ... round-robin, so with a micro-batch that is a
multiple of num_streams / W, global step k holds the same samples for any W: changing
the number of GPUs does not change what the model sees. DataLoader worker w of K takes
every K-th of its rank's streams (a DataLoader batch comes from one worker, so the
order does depend on K).

The resume state is, per stream, (epoch, position in that epoch's shard order, sample
offset in the shard's permutation): resuming opens only the shard a stream is in and
jumps to the offset, without reading anything before it. With a shard count that is
not a multiple of num_streams, a stream's next shard may already be in the next epoch;
that keeps every stream fed even with fewer shards than streams.

Samples are grouped from member names as webdataset groups them (`base_plus_ext`, lower-cased
extensions, `__name__` meta members skipped), so shards written by webdataset.ShardWriter or
img2dataset read as they do in webdataset.WebDataset. The tar reading itself stays here:
webdataset's reader streams a tar front to back, while a permuted shard and a resume that seeks
to a sample offset need the header index read below (docs/data.md, "Shards from other tools").

A mixture of sources (mixture.py) keeps this shape: every source has its own endless
shard sequence split over the same logical streams, and each logical stream picks the
source of its k-th sample by weight from (seed, stream, k). A stream's state is then one
(epoch, position, offset) per source plus its draw counter.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from webdataset.tariterators import base_plus_ext

from llava_train.data.errors import BadSample
from llava_train.data.health import SkipLog
from llava_train.data.mixture import Source, SourceChooser, as_sources, rng

__all__ = ["BadSample", "ShardStream", "Source", "build_loader", "expand_urls", "shard_sizes"]

INDEX_FILE = "index.json"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members (its tar_file_iterator's skip_meta)
_END = object()


# ----------------------------------------------------------------------------- paths


def expand_urls(patterns: list[str] | str) -> list[str]:
    """Local shard paths from paths, globs, folders and brace patterns, in a stable order."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    urls = []
    for pattern in patterns:
        for path in braceexpand(os.path.expanduser(str(pattern))):
            found = _match(path)
            if not found:
                origin = f" (from pattern {pattern!r})" if path != str(pattern) else ""
                raise FileNotFoundError(f"no shard file matches {path!r}{origin}; check data.train / data.eval")
            urls += found
    if not urls:
        raise FileNotFoundError("no shard patterns given; set data.train (and data.eval) to shard paths")
    return list(dict.fromkeys(urls))  # a shard listed twice would be read twice per epoch


def _match(path: str) -> list[str]:
    if glob.has_magic(path):
        return sorted(p for p in glob.glob(path) if os.path.isfile(p))
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    return [path] if os.path.isfile(path) else []


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples per shard, from the writer's index.json where present, else by scanning the tar."""
    indexes: dict[Path, dict[str, int]] = {}
    sizes = []
    for url in urls:
        folder = Path(url).parent
        if folder not in indexes:
            index_path = folder / INDEX_FILE
            entries = json.loads(index_path.read_text())["shards"] if index_path.is_file() else []
            indexes[folder] = {e["name"]: e["num_samples"] for e in entries}
        known = indexes[folder].get(Path(url).name)
        sizes.append(known if known is not None else _count_samples(url))
    return sizes


def _count_samples(url: str) -> int:
    try:
        with tarfile.open(url, "r:") as tar:
            return len({split[0] for info in tar if (split := _split(info))})
    except (tarfile.TarError, OSError):
        return 0


def _split(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member, as webdataset splits it: the key is everything
    before the first dot of the file name; the extension is lower-cased."""
    if not info.isfile() or _META.match(info.name):
        return None
    key, ext = base_plus_ext(info.name)
    return (key, ext.lower()) if key is not None else None


# ----------------------------------------------------------------------------- stream


class ShardStream(IterableDataset):
    """Samples of one or more sources run through `encode`, in the world-size-invariant order above.

    `urls` is a list of shard paths (one source) or of `Source`s (a weighted mixture: each
    logical stream reads its share of every source and picks the source of each sample by
    weight, see mixture.py). `encode(raw)` gets {"__key__", "__shard__", "__source__",
    "json": parsed record, <ext>: bytes per member} ("json" is {} for a sample with a `txt` caption
    and no record, as img2dataset can write); it may raise BadSample or return None
    to skip. Skips, corrupt members and bad json are counted by reason (`self.skipped`, also
    in the state) instead of crashing, unless more than `max_bad_fraction` of the samples
    are bad (health.py).
    """

    def __init__(
        self,
        urls: list[str] | list[Source],
        encode: Callable[[dict], object],
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_streams: int = 8,
        loop: bool = True,
        max_bad_fraction: float | None = None,
    ):
        self.sources = as_sources(urls)
        if not self.sources[0].urls:
            raise ValueError("ShardStream needs at least one shard; check data.train / data.eval")
        compressed = [u for s in self.sources for u in s.urls if not str(u).endswith(".tar")]
        if compressed:
            raise ValueError(
                f"shards must be uncompressed .tar files (samples are read by seeking), got {compressed[0]!r}; "
                "decompress them or rewrite them with data_tools/shard_writer.py"
            )
        if len(self.sources) > 1 and not loop:
            raise ValueError("a weighted mixture of sources has no end; read it with loop=True")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_streams % world_size:
            raise ValueError(
                f"num_streams={num_streams} must be divisible by the world size {world_size}: "
                "use a number of ranks that divides it"
            )
        self.encode = encode
        self.seed, self.loop = seed, loop
        self.shuffle = shuffle and loop  # an eval pass (loop=False) reads in file order
        self.rank, self.world_size, self.num_streams = rank, world_size, num_streams
        self.max_bad_fraction = max_bad_fraction
        self.health = SkipLog(max_bad_fraction)
        self.choose = SourceChooser(self.sources, seed)
        self._cursor: _Cursor | None = None  # where the latest iteration stands
        self._pending: dict | None = None  # a loaded state, applied by the next __iter__
        self._order_cache: dict[int, tuple[int, list[int]]] = {}  # source -> (epoch, shard order)

    @property
    def urls(self) -> list[str]:
        return [u for s in self.sources for u in s.urls]

    @property
    def skipped(self) -> Counter:
        return self.health.skipped

    @property
    def num_samples(self) -> int:
        """Samples in one pass over all shards (all ranks together)."""
        return sum(shard_sizes(self.urls))

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator:
        streams = self.local_streams()
        if self._pending is not None:
            self._cursor = self._restore(self._pending, streams)
            self._pending = None
        else:
            self._cursor = _Cursor.start(streams, len(self.sources))
            self.health = SkipLog(self.max_bad_fraction)
        return self._interleave(streams, self._cursor)

    def local_streams(self) -> list[int]:
        streams = list(range(self.rank, self.num_streams, self.world_size))
        info = get_worker_info()
        if info is None:
            return streams
        check_worker_split(self.num_streams, self.world_size, info.num_workers)
        return streams[info.id :: info.num_workers]

    def _interleave(self, streams: list[int], cursor: "_Cursor") -> Iterator:
        # The cursor is updated before each yield: the consumer snapshots it while we are suspended.
        readers = {s: self._read_stream(s, cursor.streams[s]) for s in streams}
        live = set(streams)
        while live:
            stream = streams[cursor.turn]
            cursor.turn = (cursor.turn + 1) % len(streams)
            if stream not in live:
                continue
            item = next(readers[stream], _END)
            if item is _END:
                live.discard(stream)
                continue
            yield item

    def _read_stream(self, stream: int, position: "_StreamPosition") -> Iterator:
        """One logical stream: its share of the only source, or a weighted draw per sample from all."""
        readers = [self._read_source(i, stream, position.shards[i]) for i in range(len(self.sources))]
        if len(readers) == 1:
            yield from readers[0]
            return
        while True:  # mixtures loop forever (checked in __init__), so a reader never runs dry
            item = next(readers[self.choose(stream, position.draws)])
            position.draws += 1
            yield item

    def _read_source(self, source: int, stream: int, position: list[int]) -> Iterator:
        """`position` = [global shard index g, sample offset] in the source's endless shard sequence,
        advanced in place."""
        n, barren = len(self.sources[source].urls), 0
        while self.loop or position[0] < n:
            found = False
            for item in self._read_shard(source, position):
                found = True
                yield item
            barren = 0 if found else barren + 1
            if barren >= 2 * max(n, self.num_streams):
                raise RuntimeError(
                    f"data stream {stream} of source {self.sources[source].name!r} read {barren} shards in a row "
                    f"without a usable sample (skipped so far: {dict(self.skipped)}); "
                    "check the shards and the template/max_length"
                )
            position[0] += self.num_streams
            position[1] = 0

    def _read_shard(self, source: int, position: list[int]) -> Iterator:
        urls = self.sources[source].urls
        epoch, index = divmod(position[0], len(urls))
        url = urls[self._epoch_order(source, epoch)[index]]
        name = os.path.basename(url)
        first_visit = position[1] == 0  # count shard-level damage once, not again on resume
        try:
            tar = tarfile.open(url, "r:")
        except (tarfile.TarError, OSError) as err:
            if first_visit:
                self._skip("corrupt shard", url, str(err))
            return
        with tar:
            samples = self._index(tar, url, first_visit)
            order = list(range(len(samples)))
            if self.shuffle:
                rng(self.seed, self.sources[source].name, epoch, name).shuffle(order)
            while position[1] < len(order):
                key, members = samples[order[position[1]]]
                position[1] += 1
                item = self._load(tar, key, members, name, self.sources[source].name)
                if item is not None:
                    yield item

    def _index(self, tar: tarfile.TarFile, url: str, count_errors: bool) -> list[tuple[str, dict]]:
        """Member headers grouped by sample key, in file order; no data is read here."""
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            for info in tar:
                split = _split(info)
                if split:
                    samples.setdefault(split[0], {})[split[1]] = info
        except (tarfile.TarError, OSError) as err:  # keep the samples before the damage
            if count_errors:
                self._skip("corrupt shard", url, str(err))
        return list(samples.items())

    def _load(self, tar: tarfile.TarFile, key: str, members: dict, shard: str, source: str):
        """The encoded sample, or None after counting why it was skipped."""
        try:
            raw = {"__key__": key, "__shard__": shard, "__source__": source, **_read_members(tar, members)}
            if "json" not in raw:
                if "txt" not in raw:  # a caption alone is a sample (raw_sample.py builds its conversation)
                    raise BadSample("missing json", f"no .json record or .txt caption; members {sorted(members)}")
                raw["json"] = b"{}"
            try:
                raw["json"] = json.loads(raw["json"])
            except ValueError as err:
                raise BadSample("bad json", str(err)) from None
            if not isinstance(raw["json"], dict):
                raise BadSample("bad json", "the record is not a JSON object")
            item = self.encode(raw)
            if item is None:
                raise BadSample("rejected", "the encoder returned None")
        except BadSample as bad:
            self._skip(bad.reason, f"{shard}/{key}", str(bad))
            return None
        self.health.ok()
        return item

    def _skip(self, reason: str, key: str, detail: str) -> None:
        self.health.skip(reason, key, detail)

    def _epoch_order(self, source: int, epoch: int) -> list[int]:
        count = len(self.sources[source].urls)
        if not self.shuffle:
            return list(range(count))
        cached = self._order_cache.get(source)
        if cached is None or cached[0] != epoch:
            order = list(range(count))
            rng(self.seed, self.sources[source].name, epoch).shuffle(order)
            self._order_cache[source] = cached = (epoch, order)
        return cached[1]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        if self._pending is not None:
            return copy.deepcopy(self._pending)
        cursor = self._cursor or _Cursor.start(self.local_streams(), len(self.sources))
        sizes = [len(s.urls) for s in self.sources]
        streams = []
        for stream, position in sorted(cursor.streams.items()):
            shards = [
                {"epoch": g // n, "position": g % n, "offset": offset} for (g, offset), n in zip(position.shards, sizes)
            ]
            streams.append({"stream": stream, "draws": position.draws, "sources": shards})
        return {
            **self._setup(),
            "streams": streams,
            "turn": cursor.turn,
            **self.health.state_dict(),
        }

    def _setup(self) -> dict:
        """What a saved state must agree with to be resumed here."""
        return {
            "source_names": [s.name for s in self.sources],
            "num_shards": [len(s.urls) for s in self.sources],
            "num_streams": self.num_streams,
            "world_size": self.world_size,
            "rank": self.rank,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in self._setup().items():
            if state.get(key) != mine:
                raise ValueError(
                    f"the data loader state was saved with {key}={state.get(key)}, but this run has {key}={mine}; "
                    "resume with the same data sources and shards, num_streams and number of ranks"
                )
        self._pending = copy.deepcopy(state)
        self.health.load_state_dict(state)

    def _restore(self, state: dict, streams: list[int]) -> "_Cursor":
        sizes = [len(s.urls) for s in self.sources]
        saved = {
            e["stream"]: _StreamPosition(
                [[p["epoch"] * n + p["position"], p["offset"]] for p, n in zip(e["sources"], sizes)], e["draws"]
            )
            for e in state["streams"]
        }
        if sorted(saved) != sorted(streams):
            raise ValueError(
                f"the data loader state holds streams {sorted(saved)} but this reader has {streams}; "
                "resume with the same data.num_workers and number of ranks"
            )
        self.health.load_state_dict(state)
        return _Cursor(saved, state["turn"] % len(streams))


@dataclass
class _StreamPosition:
    """Per source [global shard index, sample offset], and how many mixture draws the stream made."""

    shards: list[list[int]]
    draws: int = 0


@dataclass
class _Cursor:
    """One iteration's progress: each local stream's position, and whose turn it is."""

    streams: dict[int, _StreamPosition]
    turn: int = 0

    @classmethod
    def start(cls, streams: list[int], num_sources: int) -> "_Cursor":
        # stream s starts at shard s of each source's endless sequence
        return cls({s: _StreamPosition([[s, 0] for _ in range(num_sources)]) for s in streams})


def _read_members(tar: tarfile.TarFile, members: dict) -> dict[str, bytes]:
    out = {}
    for ext, info in members.items():
        try:
            data = tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as err:
            raise BadSample("corrupt member", f"{info.name}: {err}") from None
        if len(data) != info.size:
            raise BadSample("corrupt member", f"{info.name}: truncated ({len(data)} of {info.size} bytes)")
        out[ext] = data
    return out


# ----------------------------------------------------------------------------- loader


def check_worker_split(num_streams: int, world_size: int, num_workers: int) -> None:
    per_rank = num_streams // world_size
    if num_workers > 1 and per_rank % num_workers:
        raise ValueError(
            f"each rank reads {per_rank} data streams (num_streams={num_streams} / world size {world_size}), "
            f"which {num_workers} loader workers cannot share evenly; set data.num_workers to a divisor of {per_rank}"
        )


def build_loader(dataset, batch_size: int | None, collate_fn, num_workers: int = 0) -> StatefulDataLoader:
    """A StatefulDataLoader: its state_dict() holds each worker's stream positions for exact resume.

    `batch_size=None` when the dataset yields whole micro-batches (batch_stream.BatchStream)."""
    check_worker_split(dataset.num_streams, dataset.world_size, num_workers)
    with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API in its constructor
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return _Loader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers)


class _Loader(StatefulDataLoader):
    def load_state_dict(self, state_dict: dict) -> None:
        # torchdata only asserts on a state from another worker count; say what to change instead.
        saved = len(state_dict["_snapshot"]["_worker_snapshots"]) if "_snapshot" in state_dict else 0
        if saved != self.num_workers:
            raise ValueError(
                f"the data loader state was saved with data.num_workers={saved}, but this run has "
                f"data.num_workers={self.num_workers}; resume with data.num_workers={saved}"
            )
        super().load_state_dict(state_dict)
