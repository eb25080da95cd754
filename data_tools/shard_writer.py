"""Write samples as webdataset tar shards plus an `index.json` of per-shard sample counts.

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
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

INDEX_FILE = "index.json"
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, counts = [], []
    shard, size, count = None, 0, 0
    for index, sample in enumerate(samples):
        members = sample_members(sample, key=f"{index:09d}")
        sample_bytes = sum(_member_size(data) for _, data in members)
        full = count >= max_samples_per_shard or (count and size + sample_bytes > max_bytes_per_shard)
        if shard is None or full:
            if shard is not None:
                shard.close()
                counts.append(count)
            paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
            shard, size, count = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT), 0, 0
        for name, data in members:
            _add_member(shard, name, data)
        size, count = size + sample_bytes, count + 1
    if shard is not None:
        shard.close()
        counts.append(count)
    _remove_stale(out_dir, prefix, keep=len(paths))
    index = {"shards": [{"name": p.name, "num_samples": n} for p, n in zip(paths, counts)]}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return [str(p) for p in paths]


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
