"""The demo data: deterministic, cached by a stamp, and the answers are true to the pictures."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_tools.demo_data import BACKGROUND, COLOURS, COUNT_WORDS, QUESTIONS, REGIONS, build_demo_data
from llava_train.data.images import decode_image
from llava_train.data.shards import ShardStream, expand_urls

SIZES = dict(num_train=24, num_eval=40, image_size=48, shape_scale=1.75, samples_per_shard=8)  # the demo's images


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
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1 and raw["json"]["images"] == ["png"]
        # every question the image answers, once each: position only when there is one shape
        asked = sorted(qtype_of(t["value"]) for t in turns[::2])
        answered = {t["value"] for t in turns[1::2]}
        expected = ["colour", "count", "position", "shape"] if "one" in answered else ["colour", "count", "shape"]
        assert asked == expected
    for raw in records(paths["pretrain"]):
        caption = raw["json"]["conversations"][1]["value"]
        assert any(colour in caption for colour in COLOURS)
    qtypes = []
    for raw in records(paths["eval"]):
        meta = raw["json"]["meta"]
        assert meta["qtype"] in QUESTIONS and raw["json"]["conversations"][1]["value"] == meta["answer"]
        qtypes.append(meta["qtype"])
    # held-out questions are balanced over the types (position too, though only one-shape images have it)
    assert sorted(Counter(qtypes).values()) == [SIZES["num_eval"] // len(QUESTIONS)] * len(QUESTIONS)


def qtype_of(question: str) -> str:
    question = question.replace("<image>\n", "")
    return next(qtype for qtype, phrasings in QUESTIONS.items() if question in phrasings)


def test_answers_match_the_pixels(built):
    _, paths = built
    for raw in records(paths["eval"]):
        assert_matches_pixels(raw["png"], raw["json"]["meta"]["qtype"], raw["json"]["meta"]["answer"])


def assert_matches_pixels(png: bytes, qtype: str, answer: str, size: int = SIZES["image_size"]) -> None:
    pixels = np.asarray(decode_image(png).convert("RGB")).astype(int)
    drawn = np.abs(pixels - BACKGROUND).sum(-1) > 60
    if qtype == "colour":
        mean = pixels[drawn].mean(0)
        assert min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum()) == answer
    if qtype == "position":
        ys, xs = np.nonzero(drawn)
        cx, cy = xs.mean() / size, ys.mean() / size
        region = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}
        assert region.get(answer, 0.4 <= cx <= 0.6 and 0.4 <= cy <= 0.6)
    if qtype == "count":
        assert COUNT_WORDS[len(blobs(drawn))] == answer
    if qtype == "shape":
        for blob in blobs(drawn):  # how much of its bounding box a shape fills tells which it is
            ys, xs = np.nonzero(blob)
            fill = blob.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
            assert min(FILL, key=lambda shape: abs(FILL[shape] - fill)) == answer, fill


def test_preference_pairs_choose_what_the_pixels_show_and_reject_another_answer(tmp_path):
    from data_tools.demo_pairs import ANSWERS, build_demo_pairs

    build_demo_pairs(tmp_path / "all", num_pairs=80, image_size=48, shape_scale=1.75, samples_per_shard=40)
    qtypes = []
    for raw in records(tmp_path / "all"):
        pair, qtype = raw["json"], raw["json"]["meta"]["qtype"]
        assert_matches_pixels(raw["png"], qtype, pair["chosen"])
        assert pair["rejected"] in ANSWERS[qtype] and pair["rejected"] != pair["chosen"]
        qtypes.append(qtype)
    assert set(qtypes) == set(ANSWERS)
    build_demo_pairs(tmp_path / "position", num_pairs=8, image_size=48, qtypes=("position",))
    assert {raw["json"]["meta"]["qtype"] for raw in records(tmp_path / "position")} == {"position"}
    with pytest.raises(ValueError, match="qtypes \\['size'\\]: choose from"):
        build_demo_pairs(tmp_path / "bad", num_pairs=1, image_size=48, qtypes=("size",))


FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """Connected regions (4-neighbourhood) of a boolean image, one mask each."""
    seen, found = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        blob, stack = np.zeros_like(mask), [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x] = blob[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
        found.append(blob)
    return found


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



def test_square_and_circle_differ_only_in_their_corners():
    from PIL import Image, ImageDraw

    from data_tools.demo_data import _draw_shape

    boxes = {}
    for shape in ("circle", "square"):
        image = Image.new("RGB", (48, 48), BACKGROUND)
        _draw_shape(ImageDraw.Draw(image), shape, 24, 24, 8, COLOURS["red"])
        ys, xs = np.nonzero((np.asarray(image) != BACKGROUND).any(-1))
        boxes[shape] = (xs.min(), xs.max(), ys.min(), ys.max())
    assert boxes["square"] == boxes["circle"]  # the same size, so size is no cue: the corners are


def test_half_the_training_images_hold_one_shape_and_held_out_counts_stay_uniform():
    from data_tools.demo_data import make_records

    sft = make_records("sft", 600, image_size=24, seed=0)
    single = sum(any(turn["value"] in REGIONS for turn in r["conversations"]) for r in sft) / len(sft)
    assert 0.45 < single < 0.55  # 1/4 forced + 3/4 x 1/3 uniform; 1/3 without the forcing
    held_out = [r["meta"]["answer"] for r in make_records("eval", 1200, image_size=24, seed=0) if r["meta"]["qtype"] == "count"]
    assert abs(held_out.count("one") / len(held_out) - 1 / 3) < 0.06
