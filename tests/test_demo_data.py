"""The demo data: deterministic, cached by a stamp, and the answers are true to the pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_tools.demo_data import BACKGROUND, COLOURS, COUNT_WORDS, QUESTIONS, build_demo_data
from llava_train.data.images import decode_image
from llava_train.data.shards import ShardStream, expand_urls

SIZES = dict(num_train=24, num_eval=40, image_size=32, samples_per_shard=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, build_demo_data(root, **SIZES)


def records(folder):
    return list(ShardStream(expand_urls([str(folder)]), lambda raw: raw, shuffle=False, loop=False))


def test_layout_counts_and_tokenizer(built):
    root, paths = built
    assert set(paths) == {"pretrain", "sft", "eval", "tokenizer"}
    for split, count in (("pretrain", 24), ("sft", 24), ("eval", 40)):
        index = json.loads((paths[split] / "index.json").read_text())
        assert sum(s["num_samples"] for s in index["shards"]) == count
        assert len(records(paths[split])) == count
    tokenizer = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    for token in ("<image>", "<|im_start|>", "<|eot_id|>"):
        assert token in tokenizer.get_vocab()
    assert tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"


def test_records_are_well_formed(built):
    _, paths = built
    for raw in records(paths["sft"]):
        turns = raw["json"]["conversations"]
        assert 2 <= len(turns) <= 6 and turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1 and raw["json"]["images"] == ["png"]
    for raw in records(paths["pretrain"]):
        caption = raw["json"]["conversations"][1]["value"]
        assert any(colour in caption for colour in COLOURS)
    for raw in records(paths["eval"]):
        meta = raw["json"]["meta"]
        assert meta["qtype"] in QUESTIONS and raw["json"]["conversations"][1]["value"] == meta["answer"]


def test_answers_match_the_pixels(built):
    _, paths = built
    for raw in records(paths["eval"]):
        meta = raw["json"]["meta"]
        pixels = np.asarray(decode_image(raw["png"]).convert("RGB")).astype(int)
        drawn = np.abs(pixels - BACKGROUND).sum(-1) > 60
        if meta["qtype"] == "colour":
            mean = pixels[drawn].mean(0)
            nearest = min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum())
            assert nearest == meta["answer"]
        if meta["qtype"] == "position":
            ys, xs = np.nonzero(drawn)
            cx, cy = xs.mean() / 32, ys.mean() / 32
            region = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}
            assert region.get(meta["answer"], 0.4 <= cx <= 0.6 and 0.4 <= cy <= 0.6)
        if meta["qtype"] == "count":
            assert COUNT_WORDS[count_blobs(drawn)] == meta["answer"]


def count_blobs(mask: np.ndarray) -> int:
    """Connected regions (4-neighbourhood) of a boolean image."""
    seen, blobs = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        blobs, stack = blobs + 1, [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return blobs


def test_build_is_deterministic_and_cached(built, tmp_path):
    root, paths = built
    other = build_demo_data(tmp_path, **SIZES)
    for split in ("pretrain", "sft", "eval"):
        mine = sorted(paths[split].glob("*.tar"))
        theirs = sorted(other[split].glob("*.tar"))
        assert [p.read_bytes() for p in mine] == [p.read_bytes() for p in theirs]
    shard = sorted(other["sft"].glob("*.tar"))[0]
    before = shard.stat().st_mtime_ns
    build_demo_data(tmp_path, **SIZES)  # same parameters: nothing is rewritten
    assert shard.stat().st_mtime_ns == before
    build_demo_data(tmp_path, **{**SIZES, "num_train": 16})  # new parameters: rebuilt
    assert len(records(other["sft"])) == 16
