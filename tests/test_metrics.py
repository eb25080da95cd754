"""Metrics sinks (metrics.jsonl, wandb, progress) and the measured peak behind MFU (StepFlops: test_flops.py)."""

from __future__ import annotations

import json
import logging
import sys
import types

import numpy as np
import psutil
import pytest
import torch

from llava_train.train import metrics as m
from llava_train.train.metrics import MetricsLogger, measure_peak_flops, peak_memory_bytes


def rows(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def logger(tmp_path, **kwargs) -> MetricsLogger:
    options = dict(rank=0, wandb_mode="disabled", wandb_project="p", run_name=None, config={},
                   total_steps=10, progress_bar=False)
    return MetricsLogger(tmp_path, **{**options, **kwargs})


# ----------------------------------------------------------------------------- metrics.jsonl


def test_rank0_writes_one_json_line_per_log_and_flushes_each(tmp_path):
    metrics = logger(tmp_path)
    metrics.log(1, {"loss": 2.5, "lr": torch.tensor(1e-3), "tokens_per_s": np.float32(100.0)})
    assert rows(tmp_path)[0]["loss"] == 2.5  # readable before close: a crash keeps what was logged
    metrics.log(2, {"loss": float("nan"), "grad_norm": float("inf"), "note": tmp_path})
    metrics.close()
    first, second = rows(tmp_path)
    assert first["step"] == 1 and first["lr"] == pytest.approx(1e-3) and first["tokens_per_s"] == 100.0
    assert isinstance(first["time"], float)
    assert second["loss"] is None and second["grad_norm"] is None  # strict JSON, no NaN literals
    assert second["note"] == str(tmp_path)


def test_non_zero_rank_does_nothing(tmp_path):
    out = tmp_path / "out"
    metrics = logger(out, rank=1, wandb_mode="offline", progress_bar=True)
    metrics.log(1, {"loss": 1.0})
    metrics.close()
    assert not out.exists()


def test_resume_drops_rows_past_the_checkpoint(tmp_path):
    with logger(tmp_path) as metrics:
        for step in range(1, 6):
            metrics.log(step, {"loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "lo')  # the half-written last line of a killed run
    with logger(tmp_path, initial_step=3) as metrics:
        metrics.log(4, {"loss": 40.0})
    assert [(row["step"], row["loss"]) for row in rows(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_without_a_terminal_progress_goes_to_log_lines(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="llava_train.train.metrics"):
        with logger(tmp_path, progress_bar=True) as metrics:  # pytest's stderr is not a TTY
            metrics.log(5, {"loss": 1.23456, "lr": 2e-5, "tokens_per_s": 12345.6})
    assert "step 5/10  loss 1.2346  lr 2.00e-05  tok/s 12,346  eta " in caplog.text


# ----------------------------------------------------------------------------- wandb


class FakeRun:
    def __init__(self, fail_log=False):
        self.logged, self.finished, self.fail_log = [], False, fail_log

    def log(self, data, step):
        if self.fail_log:
            raise RuntimeError("connection lost")
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def fake_wandb(monkeypatch, init):
    module = types.SimpleNamespace(init=init)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_receives_metrics_and_is_finished(tmp_path, monkeypatch):
    run, calls = FakeRun(), []
    fake_wandb(monkeypatch, lambda **kw: calls.append(kw) or run)
    with logger(tmp_path, wandb_mode="offline", run_name="r", config={"train": {"lr": 1}}) as metrics:
        metrics.log(3, {"loss": torch.tensor(0.5)})
    assert calls == [dict(mode="offline", project="p", name="r", config={"train": {"lr": 1}}, dir=str(tmp_path))]
    assert run.logged == [(3, {"loss": 0.5})] and run.finished


def test_wandb_failing_to_start_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(**_):
        raise RuntimeError("no network")

    fake_wandb(monkeypatch, broken)
    with pytest.warns(RuntimeWarning, match="wandb \\(online\\) could not start: RuntimeError: no network"):
        metrics = logger(tmp_path, wandb_mode="online")
    metrics.log(1, {"loss": 1.0})
    metrics.close()
    assert rows(tmp_path)[0]["loss"] == 1.0


def test_wandb_failing_mid_run_is_dropped(tmp_path, monkeypatch):
    fake_wandb(monkeypatch, lambda **_: FakeRun(fail_log=True))
    metrics = logger(tmp_path, wandb_mode="offline")
    with pytest.warns(RuntimeWarning, match="no more metrics go to wandb"):
        metrics.log(1, {"loss": 1.0})
    metrics.log(2, {"loss": 2.0})  # no second warning, no exception
    metrics.close()
    assert len(rows(tmp_path)) == 2


def test_disabled_wandb_is_never_imported(tmp_path, monkeypatch):
    fake_wandb(monkeypatch, lambda **_: pytest.fail("wandb.init called while disabled"))
    with logger(tmp_path, wandb_mode="disabled") as metrics:
        metrics.log(1, {"loss": 1.0})


# ----------------------------------------------------------------------------- TensorBoard


def tensorboard_scalars(output_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in OUTPUT/tensorboard as tensorboard itself reads it back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_number_of_each_row(tmp_path):
    with logger(tmp_path, tensorboard=True) as metrics:
        metrics.log(1, {"loss": 2.5, "lr": torch.tensor(1e-3), "data/skipped/bad_image": 0, "note": "x"})
        metrics.log(2, {"loss": float("nan"), "ok": True, "tokens_per_s": np.float32(100.0)})
    scalars = tensorboard_scalars(tmp_path)
    assert scalars == {"loss": [(1, 2.5)], "lr": [(1, pytest.approx(1e-3))], "data/skipped/bad_image": [(1, 0.0)],
                       "tokens_per_s": [(2, 100.0)]}  # no text, no flags, no NaN (null in metrics.jsonl)


def test_tensorboard_off_writes_no_event_files(tmp_path):
    with logger(tmp_path) as metrics:
        metrics.log(1, {"loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_resume_hides_events_past_the_checkpoint(tmp_path):
    with logger(tmp_path, tensorboard=True) as metrics:
        for step in range(1, 6):
            metrics.log(step, {"loss": float(step)})
    with logger(tmp_path, tensorboard=True, initial_step=3) as metrics:
        metrics.log(4, {"loss": 40.0})
    assert tensorboard_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_missing_tensorboard_package_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    with pytest.raises(m.LoggerUnavailableError, match=r"train.tensorboard is true .*pip install tensorboard"):
        logger(tmp_path, tensorboard=True)


# ----------------------------------------------------------------------------- peak FLOP/s and memory


def test_peak_flops_is_measured_and_cached(monkeypatch):
    m._PEAK_CACHE.clear()
    measured = measure_peak_flops(torch.float32, "cpu", n=128, seconds=0.05)
    assert 1e7 < measured < 1e15  # a real CPU, not a datasheet number
    # Cached: a second call does no timing at all.
    monkeypatch.setattr(m, "_time_matmuls", lambda *a: pytest.fail("measured twice"))
    assert measure_peak_flops(torch.float32, "cpu", n=128, seconds=0.05) == measured


def test_peak_flops_is_the_best_rate_seen(monkeypatch):
    m._PEAK_CACHE.clear()
    clock = [0.0]
    timings = iter([0.3, 0.2, 0.5, 0.3, 0.6, 0.4, 0.5])  # warm-up, one matmul, then rounds of 2

    def fake_time(a, b, reps):
        elapsed = next(timings)
        clock[0] += elapsed
        return elapsed

    monkeypatch.setattr(m, "_time_matmuls", fake_time)
    monkeypatch.setattr(m, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    flops = 2.0 * 64**3
    # seconds=2 and 0.2 s per matmul: rounds of int(2 / 4 / 0.2) = 2 matmuls until 2 s have passed.
    assert measure_peak_flops(torch.float32, "cpu", n=64, seconds=2.0) == pytest.approx(flops * 2 / 0.3)
    assert clock[0] == pytest.approx(0.3 + 0.2 + 0.5 + 0.3 + 0.6 + 0.4 + 0.5)  # stopped at the deadline
    m._PEAK_CACHE.clear()


def test_slow_first_matmul_is_used_as_is(monkeypatch):
    m._PEAK_CACHE.clear()
    monkeypatch.setattr(m, "_time_matmuls", lambda a, b, reps: 2.0)
    assert measure_peak_flops(torch.bfloat16, "cpu", n=32, seconds=0.5) == pytest.approx(2.0 * 32**3 / 2.0)
    m._PEAK_CACHE.clear()


def test_peak_is_measured_on_larger_matrices_on_a_gpu(monkeypatch):
    # The CPU keeps its short 2048^3 measurement; a GPU needs 8192^3 products to show its dense peak.
    assert m.peak_matmul_size(torch.device("cpu")) == 2048
    assert m.peak_matmul_size(torch.device("cuda", 0)) == 8192
    m._PEAK_CACHE.clear()
    sizes = []
    monkeypatch.setattr(m, "_measure", lambda dtype, device, n, seconds: sizes.append(n) or 1.0)
    measure_peak_flops(torch.float32, "cpu")
    assert sizes == [2048]
    m._PEAK_CACHE.clear()


def test_peak_memory_is_at_least_the_current_rss():
    assert peak_memory_bytes() >= psutil.Process().memory_info().rss * 0.9 > 10 * 2**20
