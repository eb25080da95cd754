"""Every recipe shipped in recipes/ validates, and trains for a few steps on two gloo ranks.

A shipped recipe is any YAML under recipes/ except `base.yaml` files (shared fields that
other recipes inherit), so a new recipe is covered without editing this file. The run
test keeps each recipe as written (ZeRO stage, precision, packing, LoRA, templates, ...)
and overrides only what cannot ship: paths (tiny saved stand-ins for its model folders,
the test's demo shards, its output folder), the step count and sizes (micro batch,
max_length, eval samples, loader workers). A recipe whose `stage.init_from` (or KD teacher)
points into another shipped recipe's output_dir starts from (distils from) that recipe's checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_train.model.stages import resolve_stage
from llava_train.objectives import objective_class
from llava_train.recipe import Recipe, load_recipe
from tests.conftest import TINY_LM, TINY_VISION

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.name != "base.yaml")
IDS = [str(p.relative_to(REPO / "recipes")) for p in RECIPES]
STEPS = 2


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.train.output_dir


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_shipped_chain_names_its_producers_last_checkpoint(path):
    """`OUT/checkpoints/step-N` in a recipe's init_from or KD teacher is the step its producer ends on, so the
    documented chains (demo -> dpo, kd teacher -> dpt -> sft -> dft, ...) run as written after a retune."""
    recipe = load_recipe(path)
    for ref in (recipe.stage.init_from, recipe.stage.objective.get("teacher")):
        if ref and "/checkpoints/step-" in ref:
            producer = load_recipe(producer_of(ref, path)).train
            assert ref == f"{producer.output_dir}/checkpoints/step-{producer.max_steps}", \
                f"{path.name}: {ref}, but its producer ends at step {producer.max_steps}"


def producer_of(ref: str, consumer: Path) -> Path:
    """The shipped recipe whose output_dir holds `ref` (a consumer's init_from or KD teacher)."""
    for path in RECIPES:
        if path != consumer and Path(ref).is_relative_to(load_recipe(path).train.output_dir):
            return path
    raise AssertionError(f"{consumer}: {ref} lies in no shipped recipe's output_dir")


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def stand_ins(demo_data, tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP tower and a tiny Llama saved with save_pretrained, the tokenizer beside the LM."""
    from transformers import AutoTokenizer

    from llava_train.model.build import build_language_model
    from llava_train.model.vision import build_vision_encoder

    root = tmp_path_factory.mktemp("stand_ins")
    build_vision_encoder(None, dict(TINY_VISION), "sdpa").save_pretrained(root / "vision")
    build_language_model(None, dict(TINY_LM), "sdpa").save_pretrained(root / "lm")
    AutoTokenizer.from_pretrained(demo_data / "tokenizer").save_pretrained(root / "lm")
    return {"vision": root / "vision", "lm": root / "lm", "tokenizer": demo_data / "tokenizer"}


class Runs:
    """Runs every shipped recipe once, all in one torchrun launch (producers of an `init_from` first),
    and hands each test its recipe's per-rank reports."""

    def __init__(self, demo_data: Path, stand_ins: dict[str, Path], root: Path):
        self.demo_data, self.stand_ins, self.root = demo_data, stand_ins, root
        self.reports: dict[Path, list[dict]] | None = None
        self.output = ""

    def __call__(self, path: Path) -> list[dict]:
        if self.reports is None:
            self.reports = self.launch_all()
        assert path in self.reports, f"{path} did not run (an earlier recipe failed?):\n{self.output}"
        return self.reports[path]

    def plan(self) -> list[dict]:
        jobs: dict[Path, dict] = {}

        def add(path: Path) -> dict:
            if path not in jobs:
                recipe = load_recipe(path)
                overrides = self.overrides(recipe, path)
                if recipe.stage.init_from:
                    producer = add(producer_of(recipe.stage.init_from, path))
                    overrides.append(f"stage.init_from={producer['checkpoint']}")
                teacher = recipe.stage.objective.get("teacher")  # a KD teacher: another shipped recipe's output
                if teacher:
                    producer = add(producer_of(teacher, path))
                    overrides.append(f"stage.objective.teacher={producer['checkpoint']}")
                workdir = self.workdir(path)
                jobs[path] = {"recipe": str(path), "overrides": overrides, "results": str(workdir / "results"),
                              "checkpoint": str(workdir / "out" / "checkpoints" / f"step-{STEPS}")}
            return jobs[path]

        for path in RECIPES:
            add(path)
        return list(jobs.values())  # insertion order: every producer before its consumers

    def workdir(self, path: Path) -> Path:
        return self.root / str(path.relative_to(REPO / "recipes")).replace("/", "_")

    def overrides(self, recipe: Recipe, path: Path) -> list[str]:
        workdir = self.workdir(path)
        model, data = recipe.model, recipe.data
        shards = "pretrain" if data.template == "plain" else "sft"  # captions for stage 1, chats after
        train = self.pair_shards() if reads_groups(recipe) else self.demo_data / shards  # pairs for a pair objective
        found = [
            f"data.train=[{train}/shard-*.tar]",
            f"train.output_dir={workdir / 'out'}",
            f"train.max_steps={STEPS}",
            "train.micro_batch_size=2",
            f"data.max_length={min(data.max_length, 512)}",  # room for 256 query tokens, or to pack ~80-token samples
            f"data.num_workers={min(data.num_workers, 1)}",
            "train.progress_bar=false",
        ]
        if data.eval:
            found += [f"data.eval=[{self.demo_data / 'eval'}/shard-*.tar]", "data.max_eval_samples=8"]
        for part in ("vision", "lm"):
            if getattr(model, part).path is not None:
                found.append(f"model.{part}.path={self.stand_ins[part]}")
        tokenizer = self.stand_ins["lm"] if model.lm.path is not None else self.stand_ins["tokenizer"]
        return found + [f"model.tokenizer={tokenizer}"]

    def pair_shards(self) -> Path:
        """Demo preference pairs (data_tools/demo_pairs.py) on the test's tokenizer's words, built once."""
        from data_tools.demo_pairs import build_demo_pairs

        folder = self.root / "pairs"
        if not folder.is_dir():
            build_demo_pairs(folder, num_pairs=64, image_size=32, samples_per_shard=16)
        return folder

    def launch_all(self) -> dict[Path, list[dict]]:
        jobs = self.plan()
        jobs_file = self.root / "jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd += [str(REPO / "tests" / "recipe_run_probe.py"), str(jobs_file)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        self.output = proc.stdout[-3000:] + proc.stderr[-6000:]
        reports = {}
        for job in jobs:
            files = [Path(job["results"]) / f"rank{rank}.json" for rank in range(2)]
            if all(f.is_file() for f in files):
                reports[Path(job["recipe"])] = [json.loads(f.read_text()) for f in files]
        return reports


def reads_groups(recipe: Recipe) -> bool:
    return objective_class(recipe.stage.objective["type"]).accepts_groups


@pytest.fixture(scope="module")
def runs(demo_data, stand_ins, tmp_path_factory) -> Runs:
    return Runs(demo_data, stand_ins, tmp_path_factory.mktemp("shipped_runs"))


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_shipped_recipe_trains_on_two_ranks(path, runs):
    recipe = load_recipe(path)
    reports = runs(path)
    assert [r["rank"] for r in reports] == [0, 1] and {r["world_size"] for r in reports} == {2}
    for report in reports:
        assert report["step"] == STEPS and report["loss"] is not None, report
        assert report["zero_stage"] == recipe.train.zero_stage, report
        assert report["bf16"] == (recipe.train.precision == "bf16"), report
        assert (report["samples_per_row"] > 1) == recipe.data.packing, report
        assert (report["lora_parameters"] > 0) == resolve_stage(recipe.stage).lora, report
    assert reports[0]["loss"] == reports[1]["loss"]  # the logged loss is reduced over ranks
    checkpoint = Path(reports[0]["checkpoint"])
    assert checkpoint.name == f"step-{STEPS}" and (checkpoint / "model").is_dir()
