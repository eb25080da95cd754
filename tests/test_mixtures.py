"""Weighted mixtures of sources: proportions, determinism, world-size invariance, exact resume, counts."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from data_tools.shard_writer import write_shards
from llava_train.data import pipeline
from llava_train.data.batch import Example
from llava_train.data.mixture import Source, SourceChooser, as_sources
from llava_train.data.shards import ShardStream, build_loader
from llava_train.recipe import DataConfig

CONVERSATION = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]


def write(folder, prefix: str, count: int, per_shard: int) -> list[str]:
    records = ({"id": f"{prefix}{i:03d}", "conversations": CONVERSATION} for i in range(count))
    return write_shards(records, folder, prefix=prefix, max_samples_per_shard=per_shard)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Source]:
    folder = tmp_path_factory.mktemp("mixture")
    big = write(folder, "big", 120, per_shard=10)  # 12 shards
    small = write(folder, "small", 9, per_shard=3)  # 3 shards: fewer than the 8 streams
    return [Source("big", tuple(big), weight=3.0), Source("small", tuple(small), weight=1.0)]


def sample_id(raw):
    return raw["json"]["id"]


def as_example(raw):
    return Example([1, 2], [1, 2], key=raw["json"]["id"], source=raw["__source__"])


def take(stream, n):
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


def test_sources_are_drawn_in_proportion_to_their_weights(sources):
    got = take(ShardStream(sources, sample_id, seed=0), 4000)
    share = sum(s.startswith("small") for s in got) / len(got)
    assert share == pytest.approx(0.25, abs=0.03)
    small = [s for s in got if s.startswith("small")]
    assert set(small) == {f"small{i:03d}" for i in range(9)}  # the small source loops over its epochs
    chooser = SourceChooser([Source("a", ("x.tar",), 1.0), Source("b", ("y.tar",), 1e-9)], seed=0)
    assert {chooser(0, k) for k in range(1000)} == {0}


def test_the_mixture_is_deterministic_per_seed(sources):
    first = take(ShardStream(sources, sample_id, seed=1), 200)
    assert first == take(ShardStream(sources, sample_id, seed=1), 200)
    assert first != take(ShardStream(sources, sample_id, seed=2), 200)


def test_a_global_step_holds_the_same_samples_at_any_world_size(sources):
    def step_sets(world: int, micro: int):
        loaders = [
            iter(build_loader(ShardStream(sources, sample_id, seed=3, rank=r, world_size=world), micro, list))
            for r in range(world)
        ]
        return [sorted(s for loader in loaders for s in next(loader)) for _ in range(20)]

    assert step_sets(1, 8) == step_sets(2, 4) == step_sets(4, 2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_mixture_exactly(sources, num_workers):
    def loader():
        return build_loader(ShardStream(sources, sample_id, seed=4), 4, list, num_workers=num_workers)

    iterator = iter(loader())
    expected = [next(iterator) for _ in range(40)]
    first = loader()
    iterator = iter(first)
    head = [next(iterator) for _ in range(17)]
    state = first.state_dict()
    del iterator, first
    resumed = loader()
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    assert head + [next(iterator) for _ in range(23)] == expected


def test_recipe_sources_flow_into_loaders_with_per_source_counts(sources):
    data = DataConfig(
        train=[{"name": s.name, "paths": list(s.urls), "weight": s.weight} for s in sources],
        group_by_modality_length=True,
        batching_window=16,
    )
    collate_keys = list  # the micro-batch's rows are enough to count
    loader = pipeline.train_loader(data, as_example, collate_keys, batch_size=4, seed=0, rank=0, world_size=1)
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(10)]
    handed_out = Counter(e.source for batch in batches for row in batch for e in row)
    metrics = pipeline.loader_metrics(loader)
    assert metrics["data/source/big"] == handed_out["big"] and metrics["data/source/small"] == handed_out["small"]
    assert handed_out["big"] + handed_out["small"] == 40


def test_plain_paths_stay_one_source_and_mixing_needs_names():
    data = DataConfig(train=["a.tar", "b.tar"])
    assert data.train == ["a.tar", "b.tar"] and [s.name for s in data.sources] == ["train"]
    assert [s.name for s in as_sources(["a.tar"])] == ["train"]
    with pytest.raises(ValueError, match="unique"):
        as_sources([Source("a", ("x.tar",)), Source("a", ("y.tar",))])
    with pytest.raises(ValueError, match="weights must be positive"):
        Source("a", ("x.tar",), weight=0)
    with pytest.raises(ValueError, match="loop=True"):
        ShardStream([Source("a", ("x.tar",)), Source("b", ("y.tar",))], sample_id, loop=False)


def test_a_packed_mixture_trains_and_logs_samples_per_source(demo_data, tmp_path):
    from llava_train.recipe import validate_recipe
    from llava_train.train.trainer import Trainer
    from tests.conftest import tiny_recipe_dict

    # 4 steps: packing plans a 16-sample window longest-first, so the short captions come in its later rows
    recipe = tiny_recipe_dict(demo_data, tmp_path, max_steps=4, micro_batch_size=2, log_every=1)
    recipe["data"].update(
        train=[
            {"name": "captions", "paths": [str(demo_data / "pretrain" / "shard-*.tar")], "weight": 1.0},
            {"name": "questions", "paths": [str(demo_data / "sft" / "shard-*.tar")], "weight": 2.0},
        ],
        eval=[],
        packing=True,
        max_tokens_per_row=256,
        batching_window=16,
    )
    result = Trainer(validate_recipe(recipe)).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "loss" in row][-1]
    per_source = last["data/source/captions"] + last["data/source/questions"]
    manifest = json.loads((result.checkpoint / "manifest.json").read_text())
    assert per_source == manifest["samples_seen"] > 2 * 2  # packed rows hold more than one sample each
    assert isinstance(last["loss"], float) and math.isfinite(last["loss"])  # NaN would be null in metrics.jsonl
