"""Write samples as webdataset tar shards plus an `index.json` of per-shard sample counts.

`ShardSink` fills shards one sample (list of tar members) at a time, for converters
that hand over ready members; `write_shards` feeds it whole sample dicts.
Tars are byte-for-byte reproducible (fixed mtime/owner/mode, members in input order),
so re-running a data build gives identical files and identical checksums.

Layout of one sample with key K (the shard reader in llava_train/data/shards.py):
  K.json   {"id", "conversations", "images": [ext, ...], "meta"}
  K.<ext>  one member per image, in the order of "images": "png" for a single image,
           "0.png", "1.jpg", ... for several.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

INDEX_FILE = "index.json"
TAR_RECORD = 10240  # tarfile pads an archive to a multiple of this
TAR_END = 1024  # two zero blocks close an archive
MIN_SHARD_BYTES = TAR_RECORD  # the smallest tar file there is
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    prefix: str = "shard",
    max_samples_per_shard: int = 1000,
    max_bytes_per_shard: int = 1 << 30,
) -> list[str]:
    """Write `{prefix}-{i:06d}.tar` shards and index.json into out_dir; return the shard paths.

    Each sample: {"id": str, "conversations": [...], "images": [PIL.Image | bytes, ...], "meta": {...}}.
    Stale shards of the same prefix from an earlier, larger run are removed.
    """
    if max_samples_per_shard < 1:
        raise ValueError("max_samples_per_shard must be at least 1")
    sink = ShardSink(Path(out_dir), prefix, max_samples_per_shard, max_bytes_per_shard)
    for index, sample in enumerate(samples):
        sink.add(sample_members(sample, key=f"{index:09d}"))
    return [str(Path(out_dir) / shard["name"]) for shard in sink.close()]


class ShardSink:
    """`PREFIX-000000.tar`, ... filled in order. A shard closes when it holds `max_samples` or
    the next sample would make the file exceed `max_bytes` (a single larger sample gets a
    shard of its own)."""

    def __init__(self, out_dir: Path, prefix: str, max_samples: int, max_bytes: int):
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._tar = None
        self._size = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        size = sum(_member_size(data) for _, data in members)
        if self._tar is None or self._full(size):
            self._open_next()
        for name, data in members:
            _add_member(self._tar, name, data)
        self._size += size
        self.shards[-1]["num_samples"] += 1

    def _full(self, size: int) -> bool:
        if self.shards[-1]["num_samples"] >= self.max_samples:
            return True
        file_size = math.ceil((self._size + size + TAR_END) / TAR_RECORD) * TAR_RECORD
        return file_size > self.max_bytes

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self._size = 0
        self.shards.append({"name": name, "num_samples": 0})

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> list[dict]:
        """Finish the last shard, drop stale shards of an earlier larger run, write index.json."""
        self._close_current()
        _remove_stale(self.out_dir, self.prefix, keep=len(self.shards))
        index = {"shards": self.shards}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        return self.shards


def sample_members(sample: dict, key: str) -> list[tuple[str, bytes]]:
    """The tar members of one sample: the json record, then one member per image."""
    if "conversations" not in sample:
        raise ValueError(f"sample {sample.get('id', key)!r} has no `conversations`")
    images = [_image_bytes(image, sample.get("id", key)) for image in sample.get("images") or []]
    exts = [ext if len(images) == 1 else f"{i}.{ext}" for i, (ext, _) in enumerate(images)]
    record = {
        "id": str(sample.get("id", key)),
        "conversations": sample["conversations"],
        "images": exts,
        "meta": sample.get("meta") or {},
    }
    members = [(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())]
    return members + [(f"{key}.{ext}", data) for ext, (_, data) in zip(exts, images)]


def _image_bytes(image, sample_id) -> tuple[str, bytes]:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "png", buffer.getvalue()
    if isinstance(image, (bytes, bytearray)):
        try:
            kind = Image.open(io.BytesIO(image)).format
        except Exception as err:
            raise ValueError(f"sample {sample_id!r}: image bytes are not a readable image ({err})") from None
        return _PIL_EXT.get(kind, str(kind).lower()), bytes(image)
    raise TypeError(f"sample {sample_id!r}: images must be PIL images or encoded bytes, got {type(image).__name__}")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _member_size(data: bytes) -> int:
    return 512 + (len(data) + 511) // 512 * 512  # header + data padded to tar blocks


def _remove_stale(out_dir: Path, prefix: str, keep: int) -> None:
    pattern = re.compile(re.escape(prefix) + r"-(\d{6})\.tar")
    for path in out_dir.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= keep:
            path.unlink()
