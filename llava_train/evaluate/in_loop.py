"""`train.eval_generate_every`: the `llava-train eval` scoring, run on the training model itself.

The questions are the first `train.eval_generate_samples` samples of `data.eval` (the same set for
any number of ranks), read and checked before the model is built and encoded once; rank r answers
every W-th of them. The model is the one inside the DeepSpeed engine, never a second copy: under
ZeRO-3 every forward gathers parameters, so the ranks decode in lockstep (answer.py, decode.py).
Rank 0 gathers the rows and returns the metrics the trainer logs (metrics.jsonl, wandb); each rank
writes its own rows to OUTPUT/eval_generate/step-N.rankR.jsonl.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch.distributed as dist

from llava_train.data.errors import BadSample
from llava_train.evaluate.answer import EvalOptions, Evaluator
from llava_train.evaluate.checkpoint import NO_LIMIT
from llava_train.evaluate.questions import QuestionEncoder, check_meta_fields, read_records
from llava_train.evaluate.scoring import summarise
from llava_train.recipe import Recipe


def read_checked_records(recipe: Recipe) -> list[dict]:
    """The held-out samples to answer, with the breakdown fields checked (before any model is built)."""
    records = read_records(recipe.data.eval, recipe.train.eval_generate_samples)
    check_meta_fields(records, recipe.train.eval_generate_by, recipe.data.eval)
    return records


class GenerationEval:
    def __init__(
        self, recipe: Recipe, records: list[dict], tokenizer, model, rank: int, world_size: int, device, autocast: bool
    ):
        from llava_train.data.pipeline import make_encoder

        cfg = recipe.train
        unlimited = recipe.data.model_copy(update={"max_length": NO_LIMIT})  # over-long prompts are skipped below
        encoder = QuestionEncoder(make_encoder(unlimited, tokenizer, model), recipe.data.max_length)
        self.questions, self.skipped = [], Counter()
        for raw in records[rank::world_size]:
            try:
                self.questions.append(encoder(raw))
            except BadSample as bad:
                self.skipped[bad.reason] += 1
        self.options = EvalOptions(cfg.micro_batch_size, cfg.eval_generate_max_new_tokens, tuple(cfg.eval_generate_by))
        template = encoder.encoder.template
        self.evaluator = Evaluator(model, tokenizer, template, device, autocast, lockstep=world_size > 1)
        self.out_dir = Path(cfg.output_dir) / "eval_generate"
        self.rank = rank

    def __call__(self, step: int) -> dict[str, float]:
        """Answer and score (a collective: every rank calls it); the metrics to log."""
        rows = self.evaluator.score(self.questions, self.options)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"step-{step}.rank{self.rank}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        summary = summarise(_all_rows(rows), self.options.by)
        metrics = {"eval_gen/accuracy": summary["accuracy"], "eval_gen/num": summary["num"]}
        for field, groups in summary["by"].items():
            metrics.update({f"eval_gen/{field}/{value}": stats["accuracy"] for value, stats in groups.items()})
        return metrics


def _all_rows(rows: list[dict]) -> list[dict]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]
