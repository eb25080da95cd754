"""Grouped examples: preference pairs flow from `data convert-pairs` shards through encoding and batching as
groups that are never split across micro-batches, packed rows or ranks, and resume exactly."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_tools.convert_common import ConvertOptions
from data_tools.convert_pairs import convert_pairs
from llava_train.data.batch import IGNORE_INDEX, Example
from llava_train.data.batch_stream import BatchStream, VisualBudgets
from llava_train.data.batching import BatchingConfig, pack_rows, plan
from llava_train.data.collate import collate_planned, collate_rows
from llava_train.data.encode import SampleEncoder
from llava_train.data.errors import BadSample
from llava_train.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from llava_train.data.shards import ShardStream, build_loader, expand_urls
from llava_train.data.templates import IMAGE_TOKEN, get_template
from llava_train.data.visual_tokens import VisualTokens
from llava_train.model.build import load_tokenizer
from llava_train.recipe import validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

N_IMG = 4
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def encoder(tokenizer, accept_groups=True, visual=N_IMG, max_length=128) -> SampleEncoder:
    processor = ImageProcessor(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="pad")
    template = get_template("vicuna_v1", tokenizer)
    return SampleEncoder(template, processor, visual, max_length, accept_groups=accept_groups)


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory) -> list[str]:
    """`data convert-pairs` output: 48 pairs, two of three with an image, 5 per shard."""
    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(48):
        colour = COLOURS[i % 4]
        row = {"id": f"p{i:02d}", "prompt": f"What colour is shape {i}?", "chosen": f"It is {colour}.",
               "rejected": "It is " + " and ".join(COLOURS[: 1 + i % 3]) + " and maybe purple."}  # fmt: skip
        if i % 3:
            Image.new("RGB", (32, 32), (40 * (i % 6), 90, 200)).save(root / f"{i}.png")
            row["image"] = f"{i}.png"
        rows.append(row)
    (root / "pairs.jsonl").write_text("\n".join(map(json.dumps, rows)))
    summary = convert_pairs(root / "pairs.jsonl", ConvertOptions(root / "out", samples_per_shard=5, progress=False))
    assert summary["written"] == 48
    return expand_urls([str(root / "out")])


def pair_raw(prompt="<image>\nWhat colour?", images=("jpg",), **fields) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(buffer, format="JPEG")
    record = {"id": "p1", "prompt": prompt, "chosen": "Red.", "rejected": "Blue.", "images": list(images), **fields}
    members = {ext: buffer.getvalue() for ext in images}
    return {"__key__": "000001", "__shard__": "pairs-000000.tar", "json": record, **members}


# ----------------------------------------------------------------------------- encoding


def test_a_pair_becomes_a_group_of_two_members_sharing_the_images(tokenizer):
    chosen, rejected = encoder(tokenizer)(pair_raw())
    assert (chosen.member, rejected.member) == ("chosen", "rejected") and chosen.group == rejected.group == "p1"
    assert chosen.images is rejected.images and len(chosen.images) == 1
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for example, answer in ((chosen, " Red.</s>"), (rejected, " Blue.</s>")):
        assert example.input_ids.count(image_id) == N_IMG
        supervised = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(supervised) == answer
    prompt = next(i for i, label in enumerate(chosen.labels) if label != IGNORE_INDEX)
    assert chosen.input_ids[:prompt] == rejected.input_ids[:prompt]  # one prompt, two answers
    # with a connector whose count varies, both members keep compact spans
    spec = VisualTokens(full=16, budgets=(1, 16), tokens=(1, 16))
    compact = encoder(tokenizer, visual=spec)(pair_raw())
    assert [len(e.image_slots) for e in compact] == [1, 1] and compact[0].len_at(16) == len(chosen) + 12


def test_pairs_without_an_objective_that_reads_them_are_refused(tokenizer):
    with pytest.raises(ValueError, match=r"pairs-000000\.tar.*preference pairs need an objective that reads pairs "
                                         r"\(e\.g\. dpo\)"):  # fmt: skip
        encoder(tokenizer, accept_groups=False)(pair_raw())
    with pytest.raises(BadSample, match="missing"):
        encoder(tokenizer)(pair_raw(chosen=None))
    with pytest.raises(BadSample) as bad:
        encoder(tokenizer)(pair_raw(images=()))  # an <image> without its image: skipped as for any record
    assert bad.value.reason == "image count mismatch"


def test_the_lm_objective_refuses_pair_shards_at_the_first_record(demo_data, pair_shards, tmp_path):
    recipe = tiny_recipe_dict(demo_data, tmp_path, max_steps=1)
    recipe["data"].update(train=pair_shards, eval=[])
    with pytest.raises(ValueError, match="holds preference pairs.*need an objective that reads pairs"):
        Trainer(validate_recipe(recipe)).train()


# ----------------------------------------------------------------------------- batching


def unit(i: int):
    """Every third unit a pair (lengths differ per member), the rest single samples."""
    n, images = 6 + (i * 7) % 23, [torch.zeros(3, 2, 2)] if i % 2 else []
    if i % 3:
        return Example([1] * n, [1] * n, images=images, key=f"s{i:02d}")
    return [
        Example([1] * n, [1] * n, images=images, key=f"p{i:02d}", group=f"p{i:02d}", member="chosen"),
        Example([1] * (n + 5), [1] * (n + 5), images=images, key=f"p{i:02d}", group=f"p{i:02d}", member="rejected"),
    ]


WINDOW = [unit(i) for i in range(48)]
MODES = {
    "plain": BatchingConfig(micro_batch_size=4),
    "grouped": BatchingConfig(micro_batch_size=4, group_by_modality_length=True, window=48),
    "budget": BatchingConfig(micro_batch_size=4, max_tokens_per_batch=120, group_by_modality_length=True, window=48),
    "packed": BatchingConfig(micro_batch_size=2, packing=True, max_tokens_per_row=64, window=48),
}


def check_groups_whole(batches, packed: bool) -> None:
    where = {}
    for b, batch in enumerate(batches):
        for r, row in enumerate(batch):
            for e in row:
                if e.group:
                    where.setdefault(e.group, []).append((b, r, e.member))
    assert len(where) == 16
    for group, places in where.items():
        assert sorted(m for _, _, m in places) == ["chosen", "rejected"], group
        assert len({b for b, _, _ in places}) == 1, group  # one micro-batch
        rows = [r for _, r, _ in places]
        assert len(set(rows)) == 1 if packed else rows == [rows[0], rows[0] + 1], group  # one row / adjacent rows


@pytest.mark.parametrize("mode", list(MODES))
def test_groups_are_never_split(mode):
    cfg = MODES[mode]
    windows = [WINDOW[i : i + cfg.window_size] for i in range(0, len(WINDOW), cfg.window_size)]
    batches = [b for w in windows for b in plan(w, cfg, random.Random(0))]
    keys = sorted(e.key + e.member for b in batches for row in b for e in row)
    assert keys == sorted(e.key + e.member for u in WINDOW for e in (u if isinstance(u, list) else [u]))
    check_groups_whole(batches, cfg.packing)
    if mode == "plain":  # micro_batch_size counts samples: a pair is one sample of two rows
        assert [len(b) for b in batches[:2]] == [6, 5]  # units 0-3: two pairs, two singles
    for batch in batches:
        collated = collate_rows(batch, pad_token_id=0, image_token_id=9)
        members = [e.member for row in batch for e in row]
        assert collated.group_members == members and collated.num_groups == sum(m != "rejected" for m in members)
        for g in range(collated.num_groups):  # a group's sequence ids are one chosen and one rejected, or one sample
            names = sorted(m for m, i in zip(members, collated.group_index.tolist()) if i == g)
            assert names in (["chosen", "rejected"], [""])


def test_a_group_that_cannot_fit_a_packed_row_or_a_budget_is_refused():
    pair = unit(0)
    with pytest.raises(ValueError, match=r"group 'p00' \(2 members, 17 tokens\).*max_tokens_per_row=16.*packing"):
        pack_rows([pair], capacity=16)
    assert [len(row) for row in pack_rows([pair, unit(1)], capacity=17)] == [2, 1]
    budget = BatchingConfig(micro_batch_size=4, max_tokens_per_batch=16)
    with pytest.raises(ValueError, match="max_tokens_per_batch=16"):
        plan([pair], budget, random.Random(0))


def test_collate_numbers_repeated_records_as_separate_groups():
    a, b = unit(0)
    batch = collate_rows([[a], [b], [a], [b], [Example([3], [3])]], pad_token_id=0, image_token_id=9)
    assert batch.group_index.tolist() == [0, 0, 1, 1, 2] and batch.num_groups == 3


# ----------------------------------------------------------------------------- shards: ranks, resume, pipeline


def test_ranks_read_whole_pairs(pair_shards, tokenizer):
    enc = encoder(tokenizer)
    seen = {}
    for rank in (0, 1):
        stream = ShardStream(pair_shards, enc, seed=3, rank=rank, world_size=2, loop=False)
        for item in stream:
            assert [e.member for e in item] == ["chosen", "rejected"] and len({e.key for e in item}) == 1
            seen.setdefault(item[0].key, []).append(rank)
    assert sorted(seen) == [f"p{i:02d}" for i in range(48)] and all(len(r) == 1 for r in seen.values())


def pair_loader(shards, tokenizer, cfg, num_workers=0):
    def summary(batch):
        collated = collate_planned(batch, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        return collated.keys, collated.group_members, collated.group_index.tolist(), [len(r) for r in batch]

    enc = encoder(tokenizer)
    stream = BatchStream(ShardStream(shards, enc, seed=1), cfg, VisualBudgets(enc.visual))
    return build_loader(stream, None, summary, num_workers=num_workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_pair_shards_resume_exactly_and_stay_whole(pair_shards, tokenizer, workers):
    cfg = BatchingConfig(micro_batch_size=2, packing=True, max_tokens_per_row=256, window=12)
    iterator = iter(pair_loader(pair_shards, tokenizer, cfg, workers))
    expected = [next(iterator) for _ in range(24)]  # more than one pass over the 48 pairs
    for keys, members, groups, row_sizes in expected:
        assert members == ["chosen", "rejected"] * (len(keys) // 2) and groups == [i // 2 for i in range(len(keys))]
        assert all(size % 2 == 0 for size in row_sizes)  # a packed row holds whole pairs
    first = pair_loader(pair_shards, tokenizer, cfg, workers)
    iterator = iter(first)
    head = [next(iterator) for _ in range(7)]
    state = first.state_dict()
    del iterator, first
    resumed = pair_loader(pair_shards, tokenizer, cfg, workers)
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    assert head + [next(iterator) for _ in range(17)] == expected
