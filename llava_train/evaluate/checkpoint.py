"""`llava-train eval CHECKPOINT --data SHARDS`: answer held-out questions, score, write, print.

Works on a llava_train checkpoint or an exported transformers Llava folder alike (`load_any`).
The prompt follows the template the checkpoint trained with: the model files' meta
(`template`), else the checkpoint's recipe.yaml (`data.template`), else `--template`. Every
input is checked before the model is built: the folder, the template, the shards, the meta
fields asked for. Writes OUT/predictions.jsonl (one row per question) and OUT/summary.json.

`--visual-tokens m` answers with a Matryoshka connector's m tokens per image; several
(`1,4,16,64`, or `all` the connector offers) are a budget sweep: the model loaded and the
questions encoded once, OUT/budget{m}/ per budget, and a table of accuracy per budget and field.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from llava_train.data.errors import BadSample
from llava_train.data.templates import TEMPLATES
from llava_train.evaluate.answer import EvalOptions, Evaluator
from llava_train.evaluate.questions import EvalInputError, QuestionEncoder, check_meta_fields, read_records
from llava_train.evaluate.scoring import format_sweep, format_table, summarise

NO_LIMIT = 1 << 30


@dataclass
class Prompting:
    """How the checkpoint was prompted in training: the recipe's data fields that shape a prompt."""

    template: str
    data: dict = field(default_factory=dict)  # system_prompt, image_mode, anyres_grids, max_length when known


def check_model_folder(path: str | Path) -> None:
    from llava_train.model.hf_import import is_hf_llava_folder
    from llava_train.model.io import META

    path = Path(path)
    if not path.is_dir():
        raise EvalInputError(
            f"{path} does not exist; pass a checkpoint folder (RUN/checkpoints/step-N) or an exported Llava folder"
        )
    if not (is_hf_llava_folder(path) or (path / META).is_file() or (path / "model" / META).is_file()):
        raise EvalInputError(
            f"{path} is not a checkpoint: it has neither model/{META} (a llava_train checkpoint, "
            "RUN/checkpoints/step-N) nor a config.json of model_type llava (`llava-train export` output)"
        )


def resolve_prompting(path: str | Path, template_flag: str | None = None) -> Prompting:
    from llava_train.model.prompting import recorded_prompting

    recorded = recorded_prompting(path)
    if recorded.template and template_flag and template_flag != recorded.template:
        raise EvalInputError(
            f"{path} was trained with template {recorded.template!r}, not --template {template_flag!r}; drop "
            "--template (the prompt must be the one the model trained with)"
        )
    template = recorded.template or template_flag
    if template is None:
        raise EvalInputError(
            f"{path} does not say which conversation template it trained with (no `template` in its model "
            f"files, no recipe.yaml); pass --template ({', '.join(TEMPLATES)})"
        )
    if template not in TEMPLATES:
        raise EvalInputError(f"unknown template {template!r}; valid names: {', '.join(TEMPLATES)}")
    data = {k: recorded.data[k] for k in ("image_mode", "anyres_grids", "max_length") if k in recorded.data}
    return Prompting(template, {**data, "system_prompt": recorded.system_prompt})


def evaluate_checkpoint(
    path: str | Path,
    shards: list[str],
    options: EvalOptions,
    out_dir: str | Path | None = None,
    template: str | None = None,
    limit: int | None = None,
    device: str | None = None,
    progress: bool = True,
    visual_budget: int | None = None,
) -> dict:
    """Evaluate and write OUT/predictions.jsonl + OUT/summary.json (OUT defaults to CHECKPOINT/eval); the summary."""
    return evaluate_budgets(path, shards, options, [visual_budget], out_dir, template, limit, device, progress)[0]


def evaluate_budgets(
    path: str | Path,
    shards: list[str],
    options: EvalOptions,
    budgets: list[int | None] | str,
    out_dir: str | Path | None = None,
    template: str | None = None,
    limit: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """The same questions at each visual budget (`"all"`: every budget the connector offers), the model loaded
    once; one summary per budget. Several budgets write OUT/budget{m}/ each and OUT/sweep.json."""
    check_model_folder(path)
    prompting = resolve_prompting(path, template)
    records = read_records(shards, limit)
    if not records:
        raise EvalInputError(f"{shards} hold no samples; pass the held-out shards with --data")
    check_meta_fields(records, options.by, shards)

    from llava_train.model.io import load_any

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_any(path)
    budgets = checked_budgets(model.connector.visual_tokens(), budgets)  # before any question is answered
    model.to(device)
    questions, skipped, encoder = encode_questions(records, prompting, tokenizer, model)
    if not questions:
        raise EvalInputError(f"all {len(records)} records of {shards} were skipped ({dict(skipped)}); check the shards")
    out = Path(out_dir) if out_dir else Path(path) / "eval"
    summaries = []
    for budget in budgets:
        evaluator = Evaluator(model, tokenizer, encoder.encoder.template, device, visual_budget=budget)
        start = time.perf_counter()
        label = "eval" if budget is None else f"eval@{budget}"
        with tqdm(total=len(questions), unit="q", desc=label, disable=not progress, dynamic_ncols=True) as bar:
            rows = evaluator.score(questions, options, bar)
        seconds = time.perf_counter() - start
        summary = summarise(rows, options.by)
        summary.update(
            checkpoint=str(path), data=list(shards), template=prompting.template, skipped=dict(skipped),
            seconds=round(seconds, 3), samples_per_s=len(rows) / seconds if seconds > 0 else None,
            options=asdict(options), visual_budget=budget, visual_tokens=evaluator.tokens_per_image,
        )
        write_results(out if len(budgets) == 1 else out / f"budget{budget}", rows, summary)
        summaries.append(summary)
    if len(budgets) > 1:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(summaries, indent=2))
    return summaries


def checked_budgets(spec, budgets: list[int | None] | str) -> list[int | None]:
    """The budgets to evaluate at, each one the connector offers (else an error naming the valid ones)."""
    if budgets == "all":
        if not spec.varies:
            raise EvalInputError(f"--visual-tokens all: this connector emits a fixed {spec.full} tokens per image")
        return sorted(spec.budgets, key=spec.num_tokens)
    for budget in budgets:
        try:
            spec.num_tokens(budget)
        except ValueError as exc:
            raise EvalInputError(f"--visual-tokens: {exc}") from None
    return list(budgets)


def encode_questions(records: list[dict], prompting: Prompting, tokenizer, model):
    """(questions, skipped counts by reason, the QuestionEncoder)."""
    from llava_train.data.pipeline import make_encoder
    from llava_train.recipe import DataConfig

    data = DataConfig(train=["<held-out>"], template=prompting.template, **prompting.data)
    limit = prompting.data.get("max_length") or getattr(model.lm.config, "max_position_embeddings", NO_LIMIT)
    encoder = QuestionEncoder(make_encoder(data.model_copy(update={"max_length": NO_LIMIT}), tokenizer, model), limit)
    questions, skipped = [], Counter()
    for raw in records:
        try:
            questions.append(encoder(raw))
        except BadSample as bad:
            skipped[bad.reason] += 1
    return questions, skipped, encoder


def write_results(out_dir: Path, rows: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def print_sweep(summaries: list[dict], out_dir: Path) -> None:
    print(format_sweep(summaries))
    print(f"{summaries[0]['num']} questions at each of {len(summaries)} budgets")
    print(f"wrote {out_dir}/budget*/ (predictions.jsonl, summary.json) and {out_dir / 'sweep.json'}")


def print_summary(summary: dict, out_dir: Path) -> None:
    print(format_table(summary))
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items())
    rate = f"{summary['num']} questions ({summary['samples_per_s']:.2f} samples/s)"
    print(rate + (f"; skipped {skipped}" if skipped else ""))
    print(f"wrote {out_dir / 'predictions.jsonl'} and {out_dir / 'summary.json'}")
