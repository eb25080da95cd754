"""`llava-train report RUN_DIR`: one self-contained HTML page of a run.

Reads RUN_DIR/metrics.jsonl (one row per logged step), recipe.yaml and any eval summary.json, draws
PNGs with matplotlib and embeds them as data URIs, so the page opens offline and can be mailed.
Each plot function takes metrics rows and returns a Figure, or None when the run logged no such
keys; `render_html` assembles the page; `write_report` is what the command calls.

Technique modules get plots through key conventions (docs/report.md), not through imports:
  moe/load/layer{L}/expert{E}               heat map, layers x experts (mean over logged steps)
  mod/retention/layer{L}                    bars, retention per layer (mean over logged steps)
  eval/budget{m}/{metric}[/{field}/{value}] lines, metric against visual-token budget (latest value)
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure  # the object API: no pyplot state, PNGs through the Agg canvas

METRICS_FILE = "metrics.jsonl"
MOE_LOAD = re.compile(r"^moe/load/layer(\d+)/expert(\d+)$")
RETENTION = re.compile(r"^mod/retention/layer(\d+)$")
BUDGET = re.compile(r"^eval/budget(\d+)/([^/]+)(?:/(.+)/([^/]+))?$")
EVAL_FIELD = re.compile(r"^eval/([^/]+)/(.+)/([^/]+)$")  # eval/{metric}/{field}/{value}


class ReportError(ValueError):
    """RUN_DIR is not something a report can be made of; the message names the fix."""


@dataclass
class Run:
    path: Path
    rows: list[dict]
    recipe: dict | None = None
    summaries: dict[str, dict] = field(default_factory=dict)  # eval summary.json by relative folder
    checkpoints: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading


def load_run(path: str | Path) -> Run:
    run_dir = _run_dir(Path(path))
    rows = []
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    if not rows:
        raise ReportError(f"{run_dir / METRICS_FILE} has no logged steps yet; make the report after the first "
                          f"logged step (every train.log_every steps)")
    recipe_file = run_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    summaries = {}
    for summary in sorted(run_dir.rglob("summary.json")):
        if "checkpoints" not in summary.relative_to(run_dir).parts:
            try:
                summaries[str(summary.parent.relative_to(run_dir))] = json.loads(summary.read_text())
            except json.JSONDecodeError:
                continue  # being written right now: the metrics rows carry the same numbers
    ckpt_root = run_dir / "checkpoints"
    checkpoints = sorted((p.name for p in ckpt_root.glob("step-*") if p.is_dir()), key=_step_number)
    return Run(run_dir, rows, recipe if isinstance(recipe, dict) else None, summaries, checkpoints)


def _run_dir(path: Path) -> Path:
    """The run folder for `path`, or a ReportError saying what was passed and what to pass instead."""
    wanted = "pass a run folder (a train.output_dir, holding metrics.jsonl)"
    if path.is_file() and path.name == METRICS_FILE:
        return path.parent
    if not path.exists():
        raise ReportError(f"{path} does not exist; {wanted}")
    if not path.is_dir():
        raise ReportError(f"{path} is a file, not a run folder; {wanted}")
    if (path / METRICS_FILE).is_file():
        return path
    if (path / "manifest.json").is_file() and path.parent.name == "checkpoints":
        raise ReportError(f"{path} is a checkpoint, not a run folder; pass {path.parent.parent}")
    inside = sorted(str(p.parent) for p in path.glob(f"*/{METRICS_FILE}"))
    if inside:
        raise ReportError(f"{path} is not a run folder (no {METRICS_FILE}); run folders inside it: {', '.join(inside)}")
    raise ReportError(f"{path} is not a run folder: it has no {METRICS_FILE}; {wanted}")


def _step_number(name: str) -> int:
    digits = name.rsplit("-", 1)[-1]
    return int(digits) if digits.isdigit() else -1


# ----------------------------------------------------------------------------- series from rows


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows that logged a finite number for it."""
    points = [(row["step"], _number(row.get(key))) for row in rows]
    points = [(step, value) for step, value in points if value is not None]
    return [s for s, _ in points], [v for _, v in points]


def keys_with(rows: list[dict], prefix: str) -> list[str]:
    """Every numeric key starting with `prefix`, in first-logged order."""
    seen = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix) and _number(value) is not None:
                seen.setdefault(key, None)
    return list(seen)


def _means(rows: list[dict], pattern: re.Pattern) -> dict[tuple, float]:
    """Mean over the run of each key matching `pattern`, keyed by its integer groups."""
    values: dict[tuple, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            match = pattern.match(key)
            if match and _number(value) is not None:
                values.setdefault(tuple(int(g) for g in match.groups()), []).append(float(value))
    return {groups: float(np.mean(v)) for groups, v in values.items()}


def latest(rows: list[dict]) -> dict[str, float]:
    """Each numeric key's value at the last row that logged it."""
    out = {}
    for row in rows:
        out.update({key: float(value) for key, value in row.items() if _number(value) is not None})
    return out


def moe_load(rows: list[dict]) -> tuple[list[int], list[int], np.ndarray] | None:
    """(layers, experts, [layers, experts] mean load; NaN where a pair was never logged)."""
    means = _means(rows, MOE_LOAD)
    if not means:
        return None
    layers = sorted({layer for layer, _ in means})
    experts = sorted({expert for _, expert in means})
    grid = np.full((len(layers), len(experts)), np.nan)
    for (layer, expert), value in means.items():
        grid[layers.index(layer), experts.index(expert)] = value
    return layers, experts, grid


def retention(rows: list[dict]) -> tuple[list[int], list[float]] | None:
    """(layers, mean fraction of tokens each layer kept)."""
    means = _means(rows, RETENTION)
    layers = sorted(layer for (layer,) in means)
    return (layers, [means[(layer,)] for layer in layers]) if means else None


def budget_curves(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Label ('accuracy' or 'accuracy color=red') -> (budgets, latest value at each budget)."""
    points: dict[str, dict[int, float]] = {}
    for key, value in latest(rows).items():
        match = BUDGET.match(key)
        if match:
            budget, metric, field_name, field_value = match.groups()
            label = metric if field_name is None else f"{metric} {field_name}={field_value}"
            points.setdefault(label, {})[int(budget)] = value
    return {label: (sorted(p), [p[b] for b in sorted(p)]) for label, p in points.items()}


def field_table(run: Run) -> list[tuple[str, str, str, str, float]]:
    """(source, metric, field, value, score): latest per-field eval rows, then each summary.json."""
    table, last_step = [], {}
    for row in run.rows:
        last_step.update({key: row["step"] for key in row})
    for key, score in latest(run.rows).items():
        match = EVAL_FIELD.match(key)
        if match and not BUDGET.match(key):
            table.append((f"metrics.jsonl step {last_step[key]}", *match.groups(), score))
    for folder, summary in run.summaries.items():
        by_field = summary.get("by_field") if isinstance(summary, dict) else None
        for field_name, values in (by_field if isinstance(by_field, dict) else {}).items():
            scores = values if isinstance(values, dict) else {}  # loose: skip shapes we do not know
            table += [(f"{folder}/summary.json", "accuracy", field_name, str(value), float(score))
                      for value, score in scores.items() if _number(score) is not None]
    return table


# ----------------------------------------------------------------------------- plots


def _figure(cols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(4.8 * cols, 3.0), layout="constrained")
    return fig, [fig.add_subplot(1, cols, i + 1) for i in range(cols)]


def _label(ax, title: str, xlabel: str = "step", ylabel: str | None = None, legend_right: bool = False) -> None:
    ax.set(title=title, xlabel=xlabel, **({"ylabel": ylabel} if ylabel else {}))
    ax.grid(alpha=0.3)
    if legend_right:  # many labels (fields): beside the axes, never over the curves
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))


def _lines(ax, rows: list[dict], keys: list[str], title: str, scale: float = 1.0) -> bool:
    drawn = False
    for key in keys:
        steps, values = series(rows, key)
        if steps:
            ax.plot(steps, [v * scale for v in values], marker="o" if len(steps) < 20 else None,
                    markersize=3, label=key)
            drawn = True
    _label(ax, title)
    if drawn and len(keys) > 1:
        ax.legend(fontsize=7)
    return drawn


def plot_curve(rows: list[dict], keys: list[str], title: str, log_y: bool = False) -> Figure | None:
    """Any keys over steps on one axis: loss (with eval_loss), lr, grad_norm."""
    fig, (ax,) = _figure()
    if not _lines(ax, rows, keys, title):
        return None
    if log_y and all(v > 0 for key in keys for v in series(rows, key)[1]):
        ax.set_yscale("log")
    return fig


def plot_throughput(rows: list[dict]) -> Figure | None:
    """tokens/s, samples/s (own axes: they differ by the sample length) and MFU (%) with and without
    the vision tower."""
    fig, (tokens, samples, util) = _figure(3)
    drawn = [_lines(tokens, rows, ["tokens_per_s"], "tokens/s"), _lines(samples, rows, ["samples_per_s"], "samples/s"),
             _lines(util, rows, ["mfu", "mfu_lm_only"], "MFU (%)", scale=100)]
    return fig if any(drawn) else None


def plot_data(rows: list[dict]) -> Figure | None:
    """Skipped samples by reason and, for mixtures, samples drawn per source (running totals)."""
    skipped, sources = keys_with(rows, "data/skipped/"), keys_with(rows, "data/source/")
    panels = [(keys, title) for keys, title in ((skipped, "skipped samples"), (sources, "samples per source")) if keys]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (keys, title) in zip(axes, panels):
        _lines(ax, rows, keys, title)
        if len(keys) == 1:
            ax.legend(fontsize=7)  # name the only reason too
    return fig


def plot_eval(rows: list[dict]) -> Figure | None:
    """Every eval/... key over steps (budget keys have their own plot): overall solid, per field dashed."""
    keys = [key for key in keys_with(rows, "eval/") if not BUDGET.match(key)]
    if not keys:
        return None
    fig, (ax,) = _figure()
    for key in keys:
        steps, values = series(rows, key)
        per_field = EVAL_FIELD.match(key) is not None
        ax.plot(steps, values, "--" if per_field else "-", marker="o", markersize=3,
                linewidth=1 if per_field else 2, label=key.removeprefix("eval/"))
    _label(ax, "evaluation", legend_right=True)
    return fig


def plot_moe_load(rows: list[dict]) -> Figure | None:
    found = moe_load(rows)
    if found is None:
        return None
    layers, experts, grid = found
    fig = Figure(figsize=(max(4.0, 0.5 * len(experts) + 2), max(2.5, 0.35 * len(layers) + 1.5)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(experts)), [str(e) for e in experts])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set(xlabel="expert", ylabel="layer", title="expert load (mean over logged steps)")
    fig.colorbar(image, ax=ax, label="load")
    return fig


def plot_retention(rows: list[dict]) -> Figure | None:
    found = retention(rows)
    if found is None:
        return None
    layers, values = found
    fig, (ax,) = _figure()
    ax.bar([str(layer) for layer in layers], values, color="tab:orange")
    ax.set_ylim(0, max(1.0, max(values)))
    ax.set(xlabel="layer", ylabel="fraction of tokens kept", title="token retention per layer (mean over logged steps)")
    return fig


def plot_budget_accuracy(rows: list[dict]) -> Figure | None:
    curves = budget_curves(rows)
    if not curves:
        return None
    fig, (ax,) = _figure()
    for label, (budgets, values) in sorted(curves.items(), key=lambda item: " " in item[0]):  # overall first
        overall = " " not in label
        ax.plot(budgets, values, "-" if overall else "--", marker="o", linewidth=2 if overall else 1, label=label)
    budgets = sorted({b for budgets, _ in curves.values() for b in budgets})
    if len(budgets) > 2:
        ax.set_xscale("log", base=2)  # budgets are usually powers of two: evenly spaced
        ax.minorticks_off()
    ax.set_xticks(budgets, [str(b) for b in budgets])
    _label(ax, "evaluation against visual-token budget (latest)", "visual tokens (budget)", legend_right=True)
    return fig


def figures(rows: list[dict]) -> list[tuple[str, Figure]]:
    """(heading, figure) for every plot this run has data for, in page order."""
    plots = [
        ("Loss", plot_curve(rows, ["loss", "eval_loss"], "loss")),
        ("Learning rate", plot_curve(rows, ["lr"], "learning rate")),
        ("Gradient norm", plot_curve(rows, ["grad_norm"], "gradient norm (before clipping)", log_y=True)),
        ("Throughput and MFU", plot_throughput(rows)),
        ("Data", plot_data(rows)),
        ("Evaluation", plot_eval(rows)),
        ("Expert load", plot_moe_load(rows)),
        ("Token retention", plot_retention(rows)),
        ("Accuracy against visual-token budget", plot_budget_accuracy(rows)),
    ]
    return [(heading, fig) for heading, fig in plots if fig is not None]


def png_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- page

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:0 24px}
img{max-width:100%}pre{background:#f6f6f6;padding:8px;font-size:12px;overflow:auto}"""


def summary_rows(run: Run) -> list[tuple[str, str]]:
    rows, last = run.rows, latest(run.rows)
    speed = series(rows, "tokens_per_s")[1]
    items = [("run folder", str(run.path)), ("last logged step", str(rows[-1]["step"]))]
    for key, label, fmt in (("loss", "last loss", ".4f"), ("eval_loss", "last eval loss", ".4f"),
                            ("peak_memory_gb", "peak memory (GB, last)", ".2f")):
        if key in last:
            items.append((label, format(last[key], fmt)))
    if speed:
        items.append(("tokens/s (median)", f"{float(np.median(speed)):,.0f}"))
    skipped = {key: value for key, value in last.items() if key.startswith("data/skipped/") and value}
    items.append(("skipped samples", ", ".join(f"{k.split('/')[-1]} {v:.0f}" for k, v in skipped.items()) or "none"))
    items.append(("checkpoints", ", ".join(run.checkpoints) or "none"))
    empty = sorted({key for row in rows for key in row} - set(last))
    if empty:  # e.g. grad_norm where the engine reports none: say so rather than drop the plot silently
        items.append(("logged without a number (null)", ", ".join(empty)))
    return items


def _table(header: tuple[str, ...] | None, rows: list[tuple]) -> str:
    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def render_html(run: Run) -> str:
    title = f"llava-train report: {run.path.name}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             _table(None, summary_rows(run))]
    parts.append("<div class='plots'>")  # side by side where the window is wide enough
    for heading, fig in figures(run.rows):
        parts.append(f"<section><h2>{html.escape(heading)}</h2>"
                     f"<img alt='{html.escape(heading)}' src='{png_data_uri(fig)}'></section>")
    parts.append("</div>")
    table = field_table(run)
    if table:
        parts.append("<h2>Evaluation per field (latest)</h2>")
        parts.append(_table(("source", "metric", "field", "value", "score"), table))
    for folder, summary in run.summaries.items():
        overall = summary.get("overall") if isinstance(summary, dict) else None
        if overall is not None:
            parts.append(f"<p>{html.escape(folder)}/summary.json overall: {html.escape(json.dumps(overall))}</p>")
    if run.recipe is not None:
        recipe_text = yaml.safe_dump(run.recipe, sort_keys=False)
        parts.append(f"<h2>Recipe</h2><details><summary>recipe.yaml</summary><pre>{html.escape(recipe_text)}</pre>"
                     "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page (default RUN_DIR/report.html) and return its path."""
    run = load_run(run_dir)
    target = Path(out) if out is not None else run.path / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(run))
    return target
