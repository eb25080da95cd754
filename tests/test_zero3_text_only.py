"""ZeRO-3 with one rank that never sees an image: training must finish, not hang in a parameter gather.

Under ZeRO-3 every rank must run the same modules, since each forward all-gathers the
parameters of the module it enters. A rank with a text-only micro-batch runs the vision
tower on a dummy image with zero weight (MultimodalLM.embed); with the tower trainable,
its zero gradients must also take part in the reduce-scatter.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from data_tools.shard_writer import write_shards
from llava_train.data.shards import ShardStream
from tests.conftest import tiny_recipe_dict

pytestmark = pytest.mark.slow
STEPS = 3


def image_or_text_shards(folder: Path) -> list[str]:
    """8 shards of 4: even shards hold image samples, odd ones text-only."""
    samples = []
    for shard in range(8):
        for i in range(4):
            with_image = shard % 2 == 0
            question = ("<image>\n" if with_image else "") + f"What is item {i}?"
            samples.append({
                "id": f"{shard}-{i}",
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": f"item {i}"}],
                "images": [Image.new("RGB", (40, 32), (40 * i, 200, 30 * shard))] if with_image else [],
            })
    return write_shards(samples, folder, max_samples_per_shard=4)


def test_a_rank_without_images_does_not_hang_zero3(demo_data, tmp_path):
    urls = image_or_text_shards(tmp_path / "data")
    # Without shuffling, shard g is logical stream g: rank 0 of 2 reads the even (image) shards, rank 1 the odd.
    for rank, has_images in [(0, True), (1, False)]:
        has_image = ShardStream(urls, lambda raw: bool(raw["json"]["images"]), shuffle=False, rank=rank, world_size=2)
        stream = iter(has_image)
        assert {next(stream) for _ in range(2 * STEPS * 2)} == {has_images}

    recipe = tiny_recipe_dict(demo_data, tmp_path / "out", max_steps=STEPS, micro_batch_size=2, zero_stage=3)
    recipe["data"].update(train=urls, eval=[], shuffle=False)
    recipe["stage"]["trainable"] = {"vision": True}  # the tower's (zero) gradients must be reduced too
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "llava_train", "train", str(recipe_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a hang fails here
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    # metrics.jsonl writes NaN/inf as null; a skipped non-finite step would still let the run exit 0.
    assert all(isinstance(row["loss"], float) and math.isfinite(row["loss"]) for row in steps), steps
    assert steps[-1]["nonfinite_skipped"] == 0
