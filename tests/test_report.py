"""`llava-train report`: plot functions on synthetic metrics rows, the page, bad input, and a real render."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from llava_train import report
from llava_train.cli import main


def training_rows(steps: int = 10) -> list[dict]:
    return [
        {"step": s, "time": 1000.0 + s, "loss": 3.0 / s, "lr": 1e-3 * s / steps, "grad_norm": 2.0 / s,
         "tokens_per_s": 100.0 * s, "samples_per_s": 2.0 * s, "mfu": 0.01 * s, "mfu_lm_only": 0.005 * s,
         "peak_memory_gb": 1.5, "data/skipped/bad_image": s // 4, "data/source/a": 3 * s, "data/source/b": s}
        for s in range(1, steps + 1)
    ]


def module_rows() -> list[dict]:
    """Two logged steps of MoE load and MoD retention, and two evaluations with budgets and fields."""
    rows = []
    for step, shift in ((5, 0.0), (10, 0.2)):
        row = {"step": step}
        row.update({f"moe/load/layer{layer}/expert{e}": layer + e / 10 + shift for layer in (0, 2, 10) for e in range(3)})
        row.update({f"mod/retention/layer{layer}": 1.0 - layer / 10 + shift for layer in (0, 1, 2)})
        rows.append(row)
        rows.append({"step": step, "eval/accuracy": 0.5 + shift, "eval/accuracy/color/red": 0.6 + shift,
                     "eval/accuracy/color/blue": 0.4 + shift,
                     **{f"eval/budget{m}/accuracy": m / 1000 + shift for m in (16, 64, 256)},
                     **{f"eval/budget{m}/accuracy/color/red": m / 2000 + shift for m in (16, 256)}})
    return rows


def write_run(path, rows, summary: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')
    (path / "recipe.yaml").write_text("train:\n  output_dir: runs/x\n  max_steps: 10\n")
    for step in (5, 10):
        (path / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (path / "checkpoints" / f"step-{step}" / "manifest.json").write_text("{}")
    if summary is not None:
        (path / "eval" / "step-10").mkdir(parents=True)
        (path / "eval" / "step-10" / "summary.json").write_text(json.dumps(summary))
    return path


# ----------------------------------------------------------------------------- series and plots


def test_series_keeps_only_rows_with_a_finite_number():
    rows = [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 1.5}, {"step": 2, "loss": None},
            {"step": 3, "loss": 1.0, "flag": True}]
    assert report.series(rows, "loss") == ([1, 3], [2.0, 1.0])
    assert report.series(rows, "flag") == ([], [])  # booleans are not curves


def test_loss_plot_draws_loss_and_sparse_eval_loss():
    rows = training_rows() + [{"step": 10, "eval_loss": 0.7}]
    fig = report.plot_curve(rows, ["loss", "eval_loss"], "loss")
    loss, eval_loss = fig.axes[0].get_lines()
    assert loss.get_xydata().tolist() == [[s, 3.0 / s] for s in range(1, 11)]
    assert eval_loss.get_xydata().tolist() == [[10, 0.7]]
    assert report.plot_curve(rows, ["no_such_key"], "x") is None


def test_throughput_plot_shows_mfu_in_percent():
    fig = report.plot_throughput(training_rows())
    tokens, samples, util = fig.axes
    assert tokens.get_lines()[0].get_ydata()[-1] == 1000.0 and samples.get_lines()[0].get_ydata()[-1] == 20.0
    mfu = util.get_lines()[0]
    assert mfu.get_label() == "mfu" and mfu.get_ydata()[-1] == pytest.approx(10.0)  # 0.1 -> 10 %


def test_data_plot_has_skips_and_sources_only_when_logged():
    fig = report.plot_data(training_rows())
    skips, sources = fig.axes
    assert [line.get_label() for line in skips.get_lines()] == ["data/skipped/bad_image"]
    assert [line.get_label() for line in sources.get_lines()] == ["data/source/a", "data/source/b"]
    without_sources = [{k: v for k, v in r.items() if not k.startswith("data/source/")} for r in training_rows()]
    assert len(report.plot_data(without_sources).axes) == 1
    assert report.plot_data([{"step": 1, "loss": 1.0}]) is None


def test_eval_plot_draws_every_eval_key_but_budgets():
    fig = report.plot_eval(module_rows())
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"accuracy", "accuracy/color/red", "accuracy/color/blue"}
    assert lines["accuracy"].get_xydata().tolist() == [[5, 0.5], [10, 0.7]]
    assert lines["accuracy/color/red"].get_linestyle() == "--"  # per field: dashed beside the overall line


def test_moe_heat_map_is_layers_by_experts_in_numeric_order_averaged_over_steps():
    layers, experts, grid = report.moe_load(module_rows())
    assert layers == [0, 2, 10] and experts == [0, 1, 2]  # layer10 after layer2, not between 0 and 2
    expected = np.array([[layer + e / 10 + 0.1 for e in range(3)] for layer in (0, 2, 10)])
    np.testing.assert_allclose(grid, expected)
    fig = report.plot_moe_load(module_rows())
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), expected)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "2", "10"]


def test_moe_heat_map_leaves_unlogged_pairs_empty():
    _, _, grid = report.moe_load([{"step": 1, "moe/load/layer0/expert0": 1.0, "moe/load/layer1/expert1": 2.0}])
    assert np.isnan(grid[0, 1]) and np.isnan(grid[1, 0]) and grid[1, 1] == 2.0


def test_retention_bars_are_the_mean_per_layer():
    fig = report.plot_retention(module_rows())
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == pytest.approx([1.1, 1.0, 0.9])


def test_budget_plot_uses_the_latest_value_per_budget_and_field():
    curves = report.budget_curves(module_rows())
    assert curves["accuracy"] == ([16, 64, 256], pytest.approx([0.216, 0.264, 0.456]))
    assert curves["accuracy color=red"] == ([16, 256], pytest.approx([0.208, 0.328]))
    fig = report.plot_budget_accuracy(module_rows())
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["accuracy", "accuracy color=red"]


def test_module_plots_appear_only_where_their_keys_exist():
    plain = [heading for heading, _ in report.figures(training_rows())]
    assert plain == ["Loss", "Learning rate", "Gradient norm", "Throughput and MFU", "Data"]
    full = [heading for heading, _ in report.figures(training_rows() + module_rows())]
    assert full[-4:] == ["Evaluation", "Expert load", "Token retention", "Accuracy against visual-token budget"]


def test_field_table_has_latest_rows_and_summary_json(tmp_path):
    summary = {"overall": 0.55, "by_field": {"qtype": {"color": 0.9, "count": 0.3}}, "extra": [1]}
    run = report.load_run(write_run(tmp_path / "run", training_rows() + module_rows(), summary))
    table = report.field_table(run)
    assert ("metrics.jsonl step 10", "accuracy", "color", "red", pytest.approx(0.8)) in table
    assert ("eval/step-10/summary.json", "accuracy", "qtype", "count", 0.3) in table
    assert not any("budget" in row[1] for row in table)


# ----------------------------------------------------------------------------- the page


def test_page_is_self_contained_with_one_png_per_plot(tmp_path):
    run_dir = write_run(tmp_path / "run", training_rows() + module_rows(), {"overall": 0.55, "by_field": {}})
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    sources = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(sources) == len(report.figures(report.load_run(run_dir).rows)) == 9
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page)  # nothing fetched: opens offline
    assert "step-5, step-10" in page and "max_steps: 10" in page and "0.55" in page


def test_keys_logged_only_as_null_are_named_not_dropped_silently(tmp_path):
    rows = [{**row, "grad_norm": None} for row in training_rows()]
    run = report.load_run(write_run(tmp_path / "run", rows))
    assert "Gradient norm" not in [heading for heading, _ in report.figures(run.rows)]
    assert ("logged without a number (null)", "grad_norm") in report.summary_rows(run)


def test_out_option_writes_elsewhere(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", training_rows())
    assert main(["report", str(run_dir / "metrics.jsonl"), "--out", str(tmp_path / "pages" / "r.html")]) == 0
    assert (tmp_path / "pages" / "r.html").is_file() and not (run_dir / "report.html").exists()
    assert str(tmp_path / "pages" / "r.html") in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda root: root / "missing", r"missing does not exist; pass a run folder"),
        (lambda root: _touch(root / "notes.txt"), r"notes.txt is a file, not a run folder"),
        (lambda root: _mkdir(root / "empty"), r"empty is not a run folder: it has no metrics.jsonl"),
        (lambda root: write_run(root / "runs" / "a", training_rows()).parent, r"run folders inside it: .*runs/a"),
        (lambda root: write_run(root / "r", training_rows()) / "checkpoints" / "step-5",
         r"step-5 is a checkpoint, not a run folder; pass .*/r$"),
        (lambda root: write_run(root / "fresh", []), r"fresh/metrics.jsonl has no logged steps yet"),
    ],
)
def test_bad_run_folder_is_one_line_naming_the_fix(tmp_path, capsys, make, expected):
    assert main(["report", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(expected, err), err


def _touch(path):
    path.write_text("x")
    return path


def _mkdir(path):
    path.mkdir()
    return path


# ----------------------------------------------------------------------------- a real browser


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def screenshot(page, png, width: int = 1200, height: int = 2400) -> None:
    """Headless Chromium's rendering of `page` (a local file), as the user's browser would show it."""
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={png.parent / 'chromium-profile'}", f"--window-size={width},{height}",
                    f"--screenshot={png}", page.as_uri()], check=True, capture_output=True, timeout=120)


def colourful_fraction(pixels: np.ndarray) -> float:
    """Share of pixels with clearly different channels: plot lines, bars and heat maps, never text."""
    spread = pixels.max(axis=2).astype(int) - pixels.min(axis=2).astype(int)
    return float((spread > 60).mean())


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    if _chromium() is None:
        pytest.skip("chromium not found: `apt-get install chromium` (.ci/run installs it)")
    from PIL import Image

    run_dir = write_run(tmp_path / "run", training_rows() + module_rows())
    page = report.write_report(run_dir)
    screenshot(page, tmp_path / "shot.png")
    pixels = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"))
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels.std() > 20  # not one flat colour
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, axes, antialiased curves
    assert colourful_fraction(pixels) > 0.002  # the embedded PNGs decoded and drew (broken images: ~0.0002)
