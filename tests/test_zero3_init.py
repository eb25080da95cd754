"""Pretrained parts load straight into ZeRO-3 partitions (deepspeed.zero.Init), and train like a plain run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_train.model.build import build_model, load_tokenizer
from llava_train.recipe import ModelConfig, validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import TINY_LM, TINY_VISION, tiny_recipe_dict
from tests.test_distributed import launch

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pretrained(demo_data, tmp_path_factory) -> dict:
    """A tiny tower and LM saved with save_pretrained: the real-checkpoint path."""
    root = tmp_path_factory.mktemp("pretrained")
    tokenizer = load_tokenizer(str(demo_data / "tokenizer"))
    torch.manual_seed(3)
    model = build_model(ModelConfig(vision={"config": TINY_VISION}, lm={"config": TINY_LM}, tokenizer="x"), tokenizer)
    model.vision.encoder.save_pretrained(root / "vision")
    model.lm.save_pretrained(root / "lm")
    return {"vision": str(root / "vision"), "lm": str(root / "lm")}


def test_two_ranks_each_hold_half_of_the_pretrained_weights(demo_data, pretrained, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "tests" / "zero3_build_probe.py"), pretrained["vision"], pretrained["lm"]]
    cmd += [str(demo_data / "tokenizer"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]  # one file per rank
    assert [report["rank"] for report in reports] == [0, 1]
    for report in reports:
        for part in ("vision", "lm"):
            assert report[part]["all_partitioned"], (report["rank"], part)
            assert report[part]["held"] <= report[part]["full"] / 2 + 64  # padding to the partition size
    assert sum(r["lm"]["held"] for r in reports) >= reports[0]["lm"]["full"]


def test_zero3_from_pretrained_folders_matches_one_process(demo_data, pretrained, tmp_path):
    def recipe(workdir: Path, micro: int, zero: int) -> dict:
        r = tiny_recipe_dict(demo_data, workdir / "out", max_steps=2, micro_batch_size=micro, zero_stage=zero)
        r["model"]["vision"] = {"path": pretrained["vision"]}
        r["model"]["lm"] = {"path": pretrained["lm"]}
        r["train"]["log_every"] = 1
        r["data"]["eval"] = []
        return r

    reference = launch(recipe(tmp_path / "one", micro=8, zero=0), tmp_path / "one", nproc=1)
    got = launch(recipe(tmp_path / "two", micro=4, zero=3), tmp_path / "two", nproc=2)
    assert sorted(got) == [1, 2]
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step


@pytest.mark.parametrize("deepspeed_bf16", [False, True], ids=["cpu-autocast", "deepspeed-bf16"])
def test_bf16_zero3_partitions_and_connector_share_one_dtype(demo_data, pretrained, tmp_path, monkeypatch,
                                                             deepspeed_bf16):
    """train.precision=bf16 under ZeRO-3 with pretrained parts: ZeRO-3 flattens every trainable partition
    into one buffer, so the loaded parts and the connector must reach the engine in one dtype. On the CPU,
    bf16 runs under autocast over fp32 weights; `deepspeed-bf16` runs DeepSpeed's bf16 mode, as on a GPU."""
    if deepspeed_bf16:
        monkeypatch.setattr(Trainer, "_autocast", property(lambda self: False))
    recipe = tiny_recipe_dict(demo_data, tmp_path / "out", max_steps=1, zero_stage=3, precision="bf16")
    recipe["model"]["vision"] = {"path": pretrained["vision"]}
    recipe["model"]["lm"] = {"path": pretrained["lm"]}
    recipe["data"]["eval"] = []
    trainer = Trainer(validate_recipe(recipe))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16 if deepspeed_bf16 else torch.float32}
    assert math.isfinite(trainer.train(save_final=False).last_loss)
