"""Checkpoint folders: atomic saves, finding the newest complete one, pruning, RNG state.

Engine-agnostic: the trainer writes whatever it wants (DeepSpeed state, model files) into
the folder `begin_save` returns; this module only decides when a folder counts.

    OUTPUT/checkpoints/
        step-200/                 complete: has manifest.json with "complete": true
        step-300/
        .step-400.partial/        being written, or left by a crash: never resumed from

A save becomes visible in one `os.rename`, after every file and then the manifest have been
fsync'd, so a crash at any moment leaves either the old set of checkpoints or the new one.
The manifest lists every file with its size, so a folder damaged later (a copy cut short, a
deleted rank file) is recognised before anything loads it (`missing_or_truncated`).
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import random
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

_COMPLETE = re.compile(r"^step-(\d+)$")
_STALE = re.compile(r"^\.step-(\d+)\.(partial|old|deleting)$")  # our own temporaries, safe to delete


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from."""


class DiskFullError(CheckpointError):
    """A checkpoint could not be written for lack of space; the previous ones are untouched."""


# ----------------------------------------------------------------------------- saving


def begin_save(root: str | Path, step: int) -> Path:
    """Make an empty `.step-N.partial` folder to write the checkpoint into (one process only;
    on a shared filesystem every rank then writes its part there)."""
    tmp = Path(root) / f".step-{step}.partial"
    if tmp.exists():  # a crashed earlier attempt at the same step
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_save(tmp: str | Path, manifest: dict) -> Path:
    """Seal a `.step-N.partial` folder: fsync its files, write manifest.json last, rename to step-N."""
    tmp = Path(tmp)
    match = re.match(r"^\.step-(\d+)\.partial$", tmp.name)
    if match is None:
        raise ValueError(f"{tmp} is not a folder made by begin_save (expected `.step-N.partial`)")
    step = int(match.group(1))
    if manifest.get("step", step) != step:
        raise ValueError(f"manifest says step {manifest['step']} but the folder is for step {step}")
    files = _fsync_tree(tmp)  # the data must be on disk before the manifest can vouch for it
    _write_durably(tmp / MANIFEST, json.dumps({**manifest, "files": files, "complete": True}, indent=2))
    _fsync_dir(tmp)
    final = tmp.parent / f"step-{step}"
    _rename_into_place(tmp, final)
    return final


def _rename_into_place(tmp: Path, final: Path) -> None:
    # rename() cannot replace a non-empty folder, so an existing step-N (the same step saved
    # again after a resume) moves aside first and is deleted once the new one is in place.
    old = final.parent / f".{final.name}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(folder: Path) -> dict[str, int]:
    """fsync every file below `folder`; returns their sizes by relative path."""
    sizes = {}
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                sizes[Path(path).relative_to(folder).as_posix()] = os.fstat(fd).st_size
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
    return dict(sorted(sizes.items()))


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new files, renames) durable. Some filesystems refuse; then
    there is nothing more we can do and the rename is as durable as that filesystem allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def build_manifest(step: int, tokens_seen: int, samples_seen: int, recipe_dict: dict) -> dict:
    """What a checkpoint is: progress counters, the recipe, and the library versions that wrote it."""
    return {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "tokens_seen": int(tokens_seen),
        "samples_seen": int(samples_seen),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "recipe": recipe_dict,
        "complete": True,
    }


def library_versions() -> dict[str, str | None]:
    versions = {name: _installed_version(name) for name in ("torch", "deepspeed", "transformers", "peft")}
    from llava_train import __version__

    versions["llava_train"] = __version__
    versions["python"] = sys.version.split()[0]
    return versions


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)  # reads package metadata; importing deepspeed would take seconds
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- finding


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete checkpoint folder, or a CheckpointError saying why it is not one."""
    path = Path(path)

    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"not a complete llava_train checkpoint: {path} ({reason})")

    if not path.is_dir():
        raise refuse("no such folder")
    file = path / MANIFEST
    if not file.is_file():
        raise refuse(f"no {MANIFEST}; the save was interrupted or this is not a step-N folder")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(f"{MANIFEST} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise refuse(f'{MANIFEST} does not say "complete": true')
    return manifest


def missing_or_truncated(path: str | Path, manifest: dict) -> list[str]:
    """Files the manifest lists that are gone or have another size now (empty = intact).
    Manifests written before the file list existed vouch for nothing more than themselves."""
    problems = []
    for rel, size in (manifest.get("files") or {}).items():
        file = Path(path) / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{rel} has {file.stat().st_size} bytes, the manifest says {size}")
    return problems


def _is_complete(path: Path) -> bool:
    try:
        read_manifest(path)
    except CheckpointError:
        return False
    return True


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete `step-N` folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _COMPLETE.match(child.name)
        if match and child.is_dir() and _is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete `step-N` under root (partials and manifest-less folders don't count)."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """Turn `train.resume` into a checkpoint folder: None = start fresh, "auto" = the newest
    complete checkpoint of this run if any, anything else = that folder, which must be complete."""
    if resume is None:
        return None
    if resume == "auto":
        found = latest_checkpoint(Path(output_dir) / "checkpoints")
        if found is None:
            log.info("train.resume=auto: no complete checkpoint under %s/checkpoints, starting fresh", output_dir)
        return found
    path = Path(resume)
    try:
        read_manifest(path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"train.resume: {exc}; point it at a step-N folder under OUTPUT/checkpoints, or use `auto`"
        ) from None
    return path


# ----------------------------------------------------------------------------- disk space


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def expected_bytes(root: str | Path, fallback: int) -> tuple[int, str]:
    """How much the next checkpoint will need, and what that is based on: the newest complete
    checkpoint (its successor has the same tensors), else `fallback` (from parameter counts)."""
    latest = latest_checkpoint(root)
    if latest is not None:
        files = read_manifest(latest).get("files")
        return (sum(files.values()) if files else folder_bytes(latest)), f"the size of {latest.name}"
    return fallback, "estimated from the parameter count"


def estimate_from_params(num_params: int, num_trainable: int) -> int:
    """A first checkpoint's size: fp32 model files and DeepSpeed's module copy (8 bytes per
    parameter) plus fp32 master weights and two Adam moments per trainable parameter (12)."""
    return 8 * num_params + 12 * num_trainable


def require_free_space(root: str | Path, needed: int) -> None:
    """Raise the ENOSPC that writing would hit, before writing anything. Filesystems that
    report no size at all (some network mounts) are not judged."""
    usage = shutil.disk_usage(_existing(root))
    if usage.total > 0 and usage.free < needed:
        raise OSError(errno.ENOSPC, "too little free space, found before writing anything")


def _existing(path: Path) -> Path:
    """The folder itself or its nearest existing parent (the first save creates the folder)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(root: str | Path, step: int, needed: int, basis: str, cause: BaseException | None) -> str:
    root = Path(root)
    latest = latest_checkpoint(root)
    kept = f"{latest} is intact" if latest is not None else "no earlier checkpoint exists"
    free = shutil.disk_usage(_existing(root)).free
    why = f" ({cause})" if cause is not None else " (another rank ran out of space)"
    return (
        f"not enough disk space to save checkpoint step-{step} in {root}{why}: it needs about "
        f"{format_bytes(needed)} ({basis}) and {format_bytes(free)} are free. Whatever was written of it "
        f"is removed and {kept}. Free some space (older step-N folders you no longer need, say) "
        "or point train.output_dir at a larger disk, then continue with --resume auto"
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def discard_partial(tmp: str | Path) -> None:
    """Remove a `.step-N.partial` folder of a save that failed (never a complete one)."""
    tmp = Path(tmp)
    if _STALE.match(tmp.name):
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- pruning


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last`, and stale temporaries.

    Call it from one process with no save in flight. Folders named step-N without a manifest
    are left alone: they are not ours to judge. Returns what was deleted.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    root = Path(root)
    doomed = complete_checkpoints(root)[:-keep_last]
    if root.is_dir():
        doomed += [child for child in root.iterdir() if _STALE.match(child.name)]
    for path in doomed:
        _delete(path)
    return doomed


def _delete(path: Path) -> None:
    # Rename first, so a crash half-way through rmtree never leaves a step-N that still looks usable.
    if _COMPLETE.match(path.name):
        hidden = path.parent / f".{path.name}.deleting"
        if hidden.exists():
            shutil.rmtree(hidden)
        os.rename(path, hidden)
        path = hidden
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, data augmentation, sampling)."""
    import numpy as np  # here, not at the top: the folder handling above imports in milliseconds
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's device only: touching the others would create a CUDA context on each.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # the current device, as captured
