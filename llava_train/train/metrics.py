"""Per-step metrics: where they go (metrics.jsonl, wandb, TensorBoard, a progress bar) and the numbers
behind throughput (the measured matmul peak that MFU divides by, peak memory; the FLOPs of a step are
train/flops.py's)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class LoggerUnavailableError(RuntimeError):
    """A logger the recipe asks for cannot start on this machine."""


def require_tensorboard() -> None:
    """Fail before any model is built when train.tensorboard is on but the package is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        raise LoggerUnavailableError(
            "train.tensorboard is true but the tensorboard package is not installed; "
            "`pip install tensorboard` (or llava_train[tensorboard]), or set train.tensorboard=false"
        ) from None


class MetricsLogger:
    """Rank 0 appends one JSON object per logged step to OUTPUT/metrics.jsonl, forwards it to
    wandb unless disabled and, with tensorboard=True, writes its numbers as scalars to event
    files in OUTPUT/tensorboard; and shows progress: a bar on a terminal, otherwise (or with
    progress_bar=False) one log line per logged step. Every other rank does nothing, so the
    trainer can call it unconditionally.

    Rows after `initial_step` are dropped first: on resume they came from the interrupted run
    past its last checkpoint and are about to be recomputed; a fresh run (initial_step=0) in an
    old output folder starts an empty file, as its checkpoints start over too.
    """

    def __init__(
        self,
        output_dir: str | Path,
        rank: int,
        wandb_mode: str = "disabled",
        wandb_project: str = "llava_train",
        run_name: str | None = None,
        config: dict | None = None,
        total_steps: int | None = None,
        progress_bar: bool = True,
        initial_step: int = 0,
        tensorboard: bool = False,
    ):
        self.active = rank == 0
        self.total_steps = total_steps
        self._file = self._bar = self._wandb = self._tensorboard = None
        if not self.active:
            return
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / METRICS_FILE
        _drop_rows_after(path, initial_step)
        self._file = open(path, "a", buffering=1)  # line-buffered: a crash loses at most one row
        self._start = (time.perf_counter(), initial_step)
        if wandb_mode != "disabled":
            self._wandb = self._init_wandb(wandb_mode, wandb_project, run_name, config or {})
        if tensorboard:
            self._tensorboard = _tensorboard_writer(self.output_dir / TENSORBOARD_DIR, initial_step)
        if progress_bar and sys.stderr.isatty():
            self._bar = _make_bar(total_steps, initial_step)

    # ------------------------------------------------------------------ sinks

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        values = {key: _plain(value) for key, value in metrics.items()}
        row = {"step": int(step), "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        if self._wandb is not None:
            self._wandb_log(step, metrics)
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):  # null (NaN) stays out
                    self._tensorboard.add_scalar(key, value, int(step))
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))
            self._bar.set_postfix_str(_summary(values), refresh=True)
        else:
            log.info("step %d%s  %s  eta %s", step, f"/{self.total_steps}" if self.total_steps else "",
                     _summary(values), _format_eta(self._eta(step)))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as exc:  # a sink failing must never fail the run
                warnings.warn(f"wandb.finish failed: {exc}", RuntimeWarning, stacklevel=2)
        self._file = self._bar = self._wandb = self._tensorboard = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ wandb

    def _init_wandb(self, mode: str, project: str, name: str | None, config: dict):
        os.environ.setdefault("WANDB_SILENT", "true")  # no banner or sync chatter between our log lines
        try:
            import wandb

            return wandb.init(mode=mode, project=project, name=name, config=config, dir=str(self.output_dir))
        except Exception as exc:
            warnings.warn(
                f"wandb ({mode}) could not start: {type(exc).__name__}: {exc}; continuing with "
                f"{self.output_dir / METRICS_FILE} only (set train.wandb.mode=disabled to skip wandb)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def _wandb_log(self, step: int, metrics: dict) -> None:
        try:
            self._wandb.log({key: _number(value) for key, value in metrics.items()}, step=int(step))
        except Exception as exc:
            warnings.warn(f"wandb.log failed ({exc}); no more metrics go to wandb", RuntimeWarning, stacklevel=3)
            self._wandb = None

    # ------------------------------------------------------------------ ETA

    def _eta(self, step: int) -> float | None:
        start_time, start_step = self._start
        done = step - start_step
        if not self.total_steps or done <= 0:
            return None
        return (time.perf_counter() - start_time) / done * max(0, self.total_steps - step)


def _tensorboard_writer(log_dir: Path, initial_step: int):
    """purge_step hides events the interrupted run wrote past `initial_step` (they are about to be
    recomputed), as _drop_rows_after does for metrics.jsonl; a fresh run hides all old ones."""
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=initial_step + 1, flush_secs=30)


def _drop_rows_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _number(value):
    return value.item() if hasattr(value, "item") else value  # tensors and numpy scalars


def _plain(value):
    """A JSON-safe value: numbers as Python numbers, NaN/inf as null (strict JSON for any reader)."""
    value = _number(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # anything else (a Path, a dtype) as readable text rather than a crash


def _summary(values: dict) -> str:
    parts = []
    for key, label, fmt in (("loss", "loss", ".4f"), ("eval_loss", "eval", ".4f"), ("lr", "lr", ".2e"),
                            ("tokens_per_s", "tok/s", ",.0f")):
        if isinstance(values.get(key), (int, float)):
            parts.append(f"{label} {values[key]:{fmt}}")
    return "  ".join(parts)


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _make_bar(total: int | None, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.5)


# ----------------------------------------------------------------------------- peak FLOP/s and memory


_PEAK_CACHE: dict[tuple, float] = {}


def measure_peak_flops(dtype: torch.dtype, device: str | torch.device = "cpu", n: int | None = None,
                       seconds: float = 0.5) -> float:
    """This machine's dense matmul throughput (FLOP/s) for `dtype`: the best rate over repeated
    n x n matmuls for about `seconds`. Measured, not looked up, so MFU means the same on a
    laptop CPU and an H100. Cached per process. `n` defaults to `peak_matmul_size(device)`.
    """
    device = torch.device(device)
    n = n or peak_matmul_size(device)
    key = (dtype, str(device), n)
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = _measure(dtype, device, n, seconds)
    return _PEAK_CACHE[key]


def peak_matmul_size(device: torch.device) -> int:
    """Matrix side for the peak measurement: 2048 keeps a CPU's measurement short; a GPU needs large
    products to reach its dense peak (an H200 ran 8192^3 bf16 ones at about 790 TFLOP/s; the GPU
    check, launch/gpu_check/, prints the rate at both sizes)."""
    return 8192 if device.type == "cuda" else 2048


@torch.no_grad()
def _measure(dtype: torch.dtype, device: torch.device, n: int, seconds: float) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2.0 * n**3

    warmup = _time_matmuls(a, b, 1)  # kernel selection, thread pool start-up, cuBLAS handles
    if warmup >= seconds:  # a slow path (e.g. bf16 without hardware support): one sample will do
        return flops / warmup
    per = _time_matmuls(a, b, 1)
    reps = max(1, int(seconds / 4 / per))  # each timing long enough to dwarf launch overhead
    best = flops / per
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        best = max(best, flops * reps / _time_matmuls(a, b, reps))
    return best


def _time_matmuls(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    _sync(a.device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    _sync(a.device)
    return max(time.perf_counter() - start, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes() -> int:
    """Peak memory of this process: allocated CUDA memory on a GPU, peak resident set on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    try:
        import resource
    except ImportError:  # Windows: no getrusage; current RSS is the best cheap answer
        import psutil

        return int(psutil.Process().memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
