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
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import os
import random
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

from llava_train.data.errors import BadSample

__all__ = ["BadSample", "ShardStream", "build_loader", "expand_urls", "shard_sizes", "skipped_counts"]

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
# webdataset's convention: the key is everything before the first dot of the file name.
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
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
            return len({m.group(1) for info in tar if info.isfile() and (m := _MEMBER.match(info.name))})
    except (tarfile.TarError, OSError):
        return 0


# ----------------------------------------------------------------------------- stream


class ShardStream(IterableDataset):
    """Samples of `urls` run through `encode`, in the world-size-invariant order above.

    `encode(raw)` gets {"__key__", "__shard__", "json": parsed record, <ext>: bytes per
    member}; it may raise BadSample or return None to skip. Skips, corrupt members and bad
    json are counted by reason in `self.skipped` (and in the state) instead of crashing.
    """

    def __init__(
        self,
        urls: list[str],
        encode: Callable[[dict], object],
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_streams: int = 8,
        loop: bool = True,
    ):
        if not urls:
            raise ValueError("ShardStream needs at least one shard; check data.train / data.eval")
        compressed = [u for u in urls if not str(u).endswith(".tar")]
        if compressed:
            raise ValueError(
                f"shards must be uncompressed .tar files (samples are read by seeking), got {compressed[0]!r}; "
                "decompress them or rewrite them with data_tools/shard_writer.py"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_streams % world_size:
            raise ValueError(
                f"num_streams={num_streams} must be divisible by the world size {world_size}: "
                "use a number of ranks that divides it"
            )
        self.urls = list(urls)
        self.encode = encode
        self.seed, self.loop = seed, loop
        self.shuffle = shuffle and loop  # an eval pass (loop=False) reads in file order
        self.rank, self.world_size, self.num_streams = rank, world_size, num_streams
        self.skipped: Counter = Counter()
        self._cursor: _Cursor | None = None  # where the latest iteration stands
        self._pending: dict | None = None  # a loaded state, applied by the next __iter__
        self._order_cache: tuple[int, list[int]] | None = None

    @property
    def num_samples(self) -> int:
        """Samples in one pass over all shards (all ranks together)."""
        return sum(shard_sizes(self.urls))

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator:
        streams = self._local_streams()
        if self._pending is not None:
            self._cursor = self._restore(self._pending, streams)
            self._pending = None
        else:
            self._cursor = _Cursor.start(streams)
            self.skipped = Counter()
        return self._interleave(streams, self._cursor)

    def _local_streams(self) -> list[int]:
        streams = list(range(self.rank, self.num_streams, self.world_size))
        info = get_worker_info()
        if info is None:
            return streams
        check_worker_split(self.num_streams, self.world_size, info.num_workers)
        return streams[info.id :: info.num_workers]

    def _interleave(self, streams: list[int], cursor: "_Cursor") -> Iterator:
        # The cursor is updated before each yield: the consumer snapshots it while we are suspended.
        readers = {s: self._read_stream(s, cursor.positions[s]) for s in streams}
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

    def _read_stream(self, stream: int, position: list[int]) -> Iterator:
        """`position` = [global shard index g, sample offset], advanced in place."""
        n, barren = len(self.urls), 0
        while self.loop or position[0] < n:
            found = False
            for item in self._read_shard(position):
                found = True
                yield item
            barren = 0 if found else barren + 1
            if barren >= 2 * max(n, self.num_streams):
                raise RuntimeError(
                    f"data stream {stream} read {barren} shards in a row without a usable sample "
                    f"(skipped so far: {dict(self.skipped)}); check the shards and the template/max_length"
                )
            position[0] += self.num_streams
            position[1] = 0

    def _read_shard(self, position: list[int]) -> Iterator:
        epoch, index = divmod(position[0], len(self.urls))
        url = self.urls[self._epoch_order(epoch)[index]]
        name = os.path.basename(url)
        first_visit = position[1] == 0  # count shard-level damage once, not again on resume
        try:
            tar = tarfile.open(url, "r:")
        except (tarfile.TarError, OSError) as err:
            if first_visit:
                self._skip("corrupt shard", f"{url}: {err}")
            return
        with tar:
            samples = self._index(tar, url, first_visit)
            order = list(range(len(samples)))
            if self.shuffle:
                _rng(self.seed, epoch, name).shuffle(order)
            while position[1] < len(order):
                key, members = samples[order[position[1]]]
                position[1] += 1
                item = self._load(tar, key, members, name)
                if item is not None:
                    yield item

    def _index(self, tar: tarfile.TarFile, url: str, count_errors: bool) -> list[tuple[str, dict]]:
        """Member headers grouped by sample key, in file order; no data is read here."""
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            for info in tar:
                match = _MEMBER.match(info.name) if info.isfile() else None
                if match:
                    samples.setdefault(match.group(1), {})[match.group(2)] = info
        except (tarfile.TarError, OSError) as err:  # keep the samples before the damage
            if count_errors:
                self._skip("corrupt shard", f"{url}: {err}")
        return list(samples.items())

    def _load(self, tar: tarfile.TarFile, key: str, members: dict, shard: str):
        """The encoded sample, or None after counting why it was skipped."""
        try:
            raw = {"__key__": key, "__shard__": shard, **_read_members(tar, members)}
            if "json" not in raw:
                raise BadSample("missing json", f"members {sorted(members)}")
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
            self._skip(bad.reason, f"{shard}/{key}: {bad}")
            return None
        return item

    def _skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] == 1:
            log.warning("skipping a sample (%s); further `%s` skips are only counted", detail, reason)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.urls)))
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = list(range(len(self.urls)))
            _rng(self.seed, epoch).shuffle(order)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        if self._pending is not None:
            return copy.deepcopy(self._pending)
        n = len(self.urls)
        cursor = self._cursor or _Cursor.start(self._local_streams())
        return {
            "num_shards": n,
            "num_streams": self.num_streams,
            "world_size": self.world_size,
            "rank": self.rank,
            "streams": [
                {"stream": s, "epoch": g // n, "position": g % n, "offset": offset}
                for s, (g, offset) in sorted(cursor.positions.items())
            ],
            "turn": cursor.turn,
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in [
            ("num_shards", len(self.urls)),
            ("num_streams", self.num_streams),
            ("world_size", self.world_size),
            ("rank", self.rank),
        ]:
            if state.get(key) != mine:
                raise ValueError(
                    f"the data loader state was saved with {key}={state.get(key)}, but this run has {key}={mine}; "
                    "resume with the same shards, num_streams and number of ranks"
                )
        self._pending = copy.deepcopy(state)
        self.skipped = Counter(state["skipped"])

    def _restore(self, state: dict, streams: list[int]) -> "_Cursor":
        n = len(self.urls)
        saved = {e["stream"]: [e["epoch"] * n + e["position"], e["offset"]] for e in state["streams"]}
        if sorted(saved) != sorted(streams):
            raise ValueError(
                f"the data loader state holds streams {sorted(saved)} but this reader has {streams}; "
                "resume with the same data.num_workers and number of ranks"
            )
        self.skipped = Counter(state["skipped"])
        return _Cursor(saved, state["turn"] % len(streams))


@dataclass
class _Cursor:
    """One iteration's progress: per stream [global shard index, sample offset], and whose turn it is."""

    positions: dict[int, list[int]]
    turn: int = 0

    @classmethod
    def start(cls, streams: list[int]) -> "_Cursor":
        return cls({s: [s, 0] for s in streams})  # stream s starts at shard s of the endless sequence


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


def _rng(*parts) -> random.Random:
    """A generator seeded by a stable hash (Python's hash() of strings changes per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# ----------------------------------------------------------------------------- loader


def check_worker_split(num_streams: int, world_size: int, num_workers: int) -> None:
    per_rank = num_streams // world_size
    if num_workers > 1 and per_rank % num_workers:
        raise ValueError(
            f"each rank reads {per_rank} data streams (num_streams={num_streams} / world size {world_size}), "
            f"which {num_workers} loader workers cannot share evenly; set data.num_workers to a divisor of {per_rank}"
        )


def build_loader(stream: ShardStream, batch_size: int, collate_fn, num_workers: int = 0) -> StatefulDataLoader:
    """A StatefulDataLoader: its state_dict() holds each worker's stream positions for exact resume."""
    check_worker_split(stream.num_streams, stream.world_size, num_workers)
    with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API in its constructor
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(stream, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers)


def skipped_counts(loader: StatefulDataLoader) -> Counter:
    """Skip counters summed over workers. With workers, `loader.dataset.skipped` (the main
    process's copy) stays empty; the workers' counts travel in the loader state."""
    if loader.num_workers == 0:
        return Counter(loader.dataset.skipped)
    total: Counter = Counter()
    _collect_skips(loader.state_dict(), total)
    return total


def _collect_skips(node, total: Counter) -> None:
    if isinstance(node, dict):
        if "skipped" in node and "num_streams" in node:
            total.update(node["skipped"])
            return
        for value in node.values():
            _collect_skips(value, total)
