"""Batching: modality-length grouping, token budgets and packing plans; BatchStream's exact resume."""

from __future__ import annotations

import random

import pytest
import torch

from data_tools.shard_writer import write_shards
from llava_train.data.batch import Example
from llava_train.data.batch_stream import BatchStream, loader_counters
from llava_train.data.batching import BatchingConfig, pack_rows, plan, row_length
from llava_train.data.shards import BadSample, ShardStream, build_loader

IMAGE = torch.zeros(3, 2, 2)


def length_of(i: int) -> int:
    return 4 + (i * 37) % 29  # 4..32 tokens, scrambled


def example(i: int, source: str = "") -> Example:
    n = length_of(i)
    images = [IMAGE] if i % 3 == 0 else []
    return Example(input_ids=[1] * n, labels=[1] * n, images=images, key=f"s{i:03d}", source=source)


def encode(raw: dict) -> Example:
    return example(int(raw["json"]["id"][1:]), raw["__source__"])


def keys(batches) -> list[list[str]]:
    return [[e.key for row in batch for e in row] for batch in batches]


def padded(batches) -> tuple[int, int]:
    """(padded tokens, all tokens) of micro-batches padded to their longest row."""
    total = sum(len(batch) * max(row_length(r) for r in batch) for batch in batches)
    real = sum(row_length(r) for batch in batches for r in batch)
    return total - real, total


WINDOW = [example(i) for i in range(64)]


def test_plain_batching_keeps_stream_order():
    cfg = BatchingConfig(micro_batch_size=4)
    assert cfg.window_size == 4 and not cfg.reorders
    batches = plan(WINDOW[:4], cfg, random.Random(0))
    assert keys(batches) == [["s000", "s001", "s002", "s003"]]


def test_grouping_separates_modalities_sorts_by_length_and_keeps_the_batch_size():
    cfg = BatchingConfig(micro_batch_size=4, group_by_modality_length=True, window=64)
    batches = plan(WINDOW, cfg, random.Random(0))
    assert sorted(k for b in keys(batches) for k in b) == sorted(e.key for e in WINDOW)
    assert all(len(b) == 4 for b in batches)  # the window is a multiple of the micro-batch
    mixed = [b for b in batches if len({row[0].has_images for row in b}) > 1]
    assert len(mixed) <= 1  # only the leftovers of the two groups share a micro-batch
    for batch in batches:
        if batch not in mixed:
            lengths = [row_length(r) for r in batch]
            assert lengths == sorted(lengths, reverse=True)
    plain = plan(WINDOW, BatchingConfig(micro_batch_size=4, window=64), random.Random(0))
    assert padded(batches)[0] < padded(plain)[0] / 3
    assert keys(plan(WINDOW, cfg, random.Random(0))) == keys(batches)  # a pure function of window and seed
    assert keys(plan(WINDOW, cfg, random.Random(1))) != keys(batches)  # micro-batch order is shuffled


@pytest.mark.parametrize("group", [False, True])
def test_token_budget_bounds_padded_tokens(group):
    cfg = BatchingConfig(micro_batch_size=4, max_tokens_per_batch=96, group_by_modality_length=group, window=64)
    batches = plan(WINDOW, cfg, random.Random(0))
    assert sorted(k for b in keys(batches) for k in b) == sorted(e.key for e in WINDOW)
    for batch in batches:
        assert len(batch) * max(row_length(r) for r in batch) <= 96
    if group:  # sorted by length, the short samples fill more rows than micro_batch_size would
        assert max(len(b) for b in batches) > 4


def test_packing_fills_rows_first_fit_decreasing():
    rows = pack_rows(WINDOW, capacity=64)
    assert sorted(e.key for row in rows for e in row) == sorted(e.key for e in WINDOW)
    assert all(row_length(r) <= 64 for r in rows)
    lower_bound = -(-sum(len(e) for e in WINDOW) // 64)
    assert len(rows) <= lower_bound + 1  # near-optimal on this mix
    assert pack_rows([example(0), Example([1] * 80, [1] * 80, key="long")], 64)[0][0].key == "long"  # own row

    cfg = BatchingConfig(micro_batch_size=3, packing=True, max_tokens_per_row=64, window=64)
    batches = plan(WINDOW, cfg, random.Random(0))
    assert all(len(b) <= 3 for b in batches) and sum(len(b) for b in batches) == len(rows)
    waste, total = padded(batches)
    assert waste / total < 0.1
    budget = BatchingConfig(micro_batch_size=1, packing=True, max_tokens_per_row=64, max_tokens_per_batch=128)
    assert all(len(b) * max(row_length(r) for r in b) <= 128 for b in plan(WINDOW, budget, random.Random(0)))


# ----------------------------------------------------------------------------- BatchStream


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    conversations = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    records = ({"id": f"s{i:03d}", "conversations": conversations} for i in range(150))
    return write_shards(records, tmp_path_factory.mktemp("batching"), max_samples_per_shard=10)


MODES = {
    "plain": BatchingConfig(micro_batch_size=4),
    "grouped": BatchingConfig(micro_batch_size=4, group_by_modality_length=True, window=24),
    "budget": BatchingConfig(micro_batch_size=4, max_tokens_per_batch=100, group_by_modality_length=True, window=24),
    "packed": BatchingConfig(micro_batch_size=2, packing=True, max_tokens_per_row=48, window=24),
}


def loader(shards, cfg, num_workers=0, calls=None, **stream):
    def counting_encode(raw):
        if calls is not None:
            calls.append(raw["json"]["id"])
        return encode(raw)

    source = ShardStream(shards, counting_encode, seed=5, **stream)
    return build_loader(BatchStream(source, cfg), None, lambda batch: keys([batch])[0], num_workers=num_workers)


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_mid_window_continues_with_exactly_the_next_batch(shards, mode):
    cfg = MODES[mode]
    iterator = iter(loader(shards, cfg))
    expected = [next(iterator) for _ in range(40)]  # several windows and more than one epoch for plain

    first = loader(shards, cfg)
    iterator = iter(first)
    head = [next(iterator) for _ in range(11)]  # stops inside a window
    state = first.state_dict()
    calls = []
    resumed = loader(shards, cfg, calls=calls)
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    tail = [next(iterator)]
    assert len(calls) <= cfg.window_size  # a resume re-reads at most the current window
    tail += [next(iterator) for _ in range(28)]
    assert head + tail == expected


def test_resume_with_workers(shards):
    cfg = MODES["packed"]
    iterator = iter(loader(shards, cfg, num_workers=2))
    expected = [next(iterator) for _ in range(30)]
    first = loader(shards, cfg, num_workers=2)
    iterator = iter(first)
    head = [next(iterator) for _ in range(9)]
    state = first.state_dict()
    del iterator, first
    resumed = loader(shards, cfg, num_workers=2)
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    assert head + [next(iterator) for _ in range(21)] == expected


@pytest.mark.parametrize("mode", list(MODES))
def test_one_pass_hands_out_every_sample_once(shards, mode):
    got = [k for batch in loader(shards, MODES[mode], loop=False) for k in batch]
    assert sorted(got) == [f"s{i:03d}" for i in range(150)]


def test_a_changed_batching_setup_is_refused_on_resume(shards):
    first = loader(shards, MODES["packed"])
    next(iter(first))
    state = first.state_dict()
    other = loader(shards, BatchingConfig(micro_batch_size=2, packing=True, max_tokens_per_row=64, window=24))
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="max_tokens_per_row=48.*max_tokens_per_row=64"):
        next(iter(other))  # the loader hands its dataset the state when iteration starts
    # Another world size is refused too (docs/data.md: the data position belongs to the ranks that wrote it).
    two_ranks = BatchStream(ShardStream(shards, encode, rank=0, world_size=2), MODES["packed"])
    with pytest.raises(ValueError, match="world_size=2, but this run has world_size=1"):
        BatchStream(ShardStream(shards, encode), MODES["packed"]).load_state_dict(two_ranks.state_dict())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_counts_are_exact_after_a_resume(shards, num_workers):
    def encode_or_skip(raw: dict) -> Example:
        if raw["json"]["id"].endswith("3"):  # one sample in ten
            raise BadSample("over-long", raw["json"]["id"])
        return encode(raw)

    def make():
        stream = BatchStream(ShardStream(shards, encode_or_skip, seed=5), MODES["grouped"])
        return build_loader(stream, None, lambda batch: keys([batch])[0], num_workers=num_workers)

    first = make()
    iterator = iter(first)
    for _ in range(6):
        next(iterator)
    state = first.state_dict()
    next(iterator)
    counted = loader_counters(first)["skipped"]
    assert set(counted) == {"over-long"} and counted["over-long"] >= 2
    resumed = make()
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert loader_counters(resumed)["skipped"] == counted


def test_counters_are_exact_after_a_resume(shards):
    cfg = MODES["grouped"]
    first = loader(shards, cfg)
    iterator = iter(first)
    for _ in range(7):
        next(iterator)
    state = first.state_dict()
    assert loader_counters(first)["sources"] == {"train": 28}
    resumed = loader(shards, cfg)
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    next(iterator)
    assert loader_counters(resumed)["sources"] == {"train": 32}
