"""`train.eval_generate_every`: the `llava-train eval` scoring on the training model, logged; under
ZeRO-3 with two gloo processes the ranks decode in lockstep and answer as one process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llava_train.evaluate.answer import EvalOptions
from llava_train.evaluate.checkpoint import evaluate_checkpoint
from llava_train.evaluate.questions import EvalInputError
from llava_train.recipe import RecipeError, validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

SAMPLES = 5  # odd: with two ranks, rank 0 answers 3 (two batches of 2), rank 1 answers 2 (one batch + a dummy)


def in_loop_recipe(demo_data: Path, out: Path, **train) -> dict:
    return tiny_recipe_dict(
        demo_data, out, max_steps=2, micro_batch_size=2, log_every=1, eval_generate_every=2,
        eval_generate_samples=SAMPLES, eval_generate_max_new_tokens=4, eval_generate_by=["qtype"], **train,
    )


def logged(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(row for row in rows if "eval_gen/accuracy" in row)


def rank_rows(out: Path, rank: int) -> list[dict]:
    path = out / "eval_generate" / f"step-2.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_as_llava_train_eval(checkpoint: Path, demo_data: Path, rows: list[dict], tmp: Path) -> None:
    """The in-loop answers equal `llava-train eval` on the checkpoint saved with the same weights."""
    options = EvalOptions(batch_size=1, max_new_tokens=4, by=("qtype",))
    summary = evaluate_checkpoint(checkpoint, [str(demo_data / "eval" / "shard-*.tar")], options, tmp, limit=SAMPLES,
                                  progress=False)
    reference = [json.loads(line) for line in (tmp / "predictions.jsonl").read_text().splitlines()]
    assert sorted((r["key"], r["prediction"], r["correct"]) for r in rows) == sorted(
        (r["key"], r["prediction"], r["correct"]) for r in reference
    )
    return summary


def test_in_loop_generation_eval_is_logged_and_matches_the_cli(demo_data, tmp_path):
    out = tmp_path / "run"
    result = Trainer(validate_recipe(in_loop_recipe(demo_data, out))).train()
    row = logged(out)
    assert row["step"] == 2 and row["eval_gen/num"] == SAMPLES
    summary = same_as_llava_train_eval(result.checkpoint, demo_data, rank_rows(out, 0), tmp_path / "cli")
    assert row["eval_gen/accuracy"] == summary["accuracy"]
    assert {k for k in row if k.startswith("eval_gen/qtype/")} == {f"eval_gen/qtype/{q}" for q in summary["by"]["qtype"]}


def test_generation_eval_needs_eval_shards(demo_data, tmp_path):
    recipe = in_loop_recipe(demo_data, tmp_path)
    recipe["data"]["eval"] = []
    with pytest.raises(RecipeError, match="eval_generate_every needs held-out shards in data.eval"):
        validate_recipe(recipe)


def test_missing_meta_field_fails_before_the_model_is_built(demo_data, tmp_path, monkeypatch):
    import llava_train.train.trainer as trainer

    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: pytest.fail("the model was built first"))
    recipe = in_loop_recipe(demo_data, tmp_path)
    recipe["train"]["eval_generate_by"] = ["difficulty"]
    with pytest.raises(EvalInputError, match="no meta field 'difficulty'"):
        Trainer(validate_recipe(recipe))


@pytest.mark.slow
def test_two_ranks_under_zero3_answer_in_lockstep(demo_data, tmp_path):
    out = tmp_path / "run"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(in_loop_recipe(demo_data, out, zero_stage=3)))
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llava_train",
           "train", str(recipe_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rank0, rank1 = rank_rows(out, 0), rank_rows(out, 1)
    assert (len(rank0), len(rank1)) == (3, 2)  # rank 1 ran one batch fewer: a dummy batch kept it in step
    assert logged(out)["eval_gen/num"] == SAMPLES
    same_as_llava_train_eval(out / "checkpoints" / "step-2", demo_data, rank0 + rank1, tmp_path / "cli")
