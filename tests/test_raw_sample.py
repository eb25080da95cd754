"""A raw shard sample -> conversation + image bytes, for the project's, ShardWriter's and img2dataset's layouts."""

from __future__ import annotations

import pytest

from llava_train.data.errors import BadSample
from llava_train.data.raw_sample import image_members, sample_parts


def turns(question: str, answer: str = "an answer") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def raw(record: dict | None = None, **members: bytes) -> dict:
    sample = {"__key__": "k", "__shard__": "s.tar", "json": record if record is not None else {}}
    return {**sample, **members}


def reason(sample: dict) -> str:
    with pytest.raises(BadSample) as caught:
        sample_parts(sample)
    return caught.value.reason


def test_the_records_images_list_wins_and_strays_are_unused():
    sample = raw({"conversations": turns("<image>\nq"), "images": ["png"]}, png=b"P", jpg=b"J", **{"0.webp": b"W"})
    parts = sample_parts(sample)
    assert (parts.image_names, parts.images, parts.kind) == (["png"], [b"P"], "conversation")
    assert sorted(parts.unused) == ["0.webp", "jpg"]
    text_only = raw({"conversations": turns("q"), "images": []}, jpg=b"J")  # a listed [] stays text-only
    assert sample_parts(text_only).images == [] and sample_parts(text_only).unused == ["jpg"]


def test_without_an_images_list_the_image_members_are_the_images_in_numeric_order():
    one = sample_parts(raw({"conversations": turns("<image>\nq")}, jpeg=b"J", cls=b"3"))
    assert (one.image_names, one.images, one.unused) == (["jpeg"], [b"J"], [])
    record = {"conversations": turns("<image><image><image> q")}
    several = sample_parts(raw(record, **{"10.png": b"c", "2.webp": b"b", "0.jpg": b"a"}))
    assert several.image_names == ["0.jpg", "2.webp", "10.png"] and several.images == [b"a", b"b", b"c"]


def test_one_image_without_a_placeholder_gets_one_in_front_of_the_first_user_turn():
    conversation = [{"from": "system", "value": "s"}, *turns("what is it?"), *turns("and now?")]
    parts = sample_parts(raw({"conversations": conversation}, jpg=b"J"))
    values = [turn["value"] for turn in parts.conversations]
    assert values == ["s", "<image>\nwhat is it?", "an answer", "and now?", "an answer"]
    openai = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert sample_parts(raw({"conversations": openai}, png=b"P")).conversations[0]["content"] == "<image>\nq"


@pytest.mark.parametrize(
    "record, members",
    [
        ({"conversations": turns("q")}, {"0.jpg": b"a", "1.jpg": b"b"}),  # two images, no placeholder: where?
        ({"conversations": turns("<image> <image> q")}, {"jpg": b"a"}),
        ({"conversations": turns("<image> q")}, {}),
        ({"conversations": turns("q"), "images": ["jpg"]}, {"jpg": b"a"}),  # the project's records are not fixed
    ],
)
def test_other_disagreements_stay_an_image_count_mismatch(record, members):
    assert reason(raw(record, **members)) == "image count mismatch"


def test_a_caption_becomes_a_pretrain_sample():
    metadata = {"url": "http://x/1.jpg", "key": "000000001", "width": 8, "height": 8, "caption": "a red dog"}
    parts = sample_parts(raw(metadata, jpg=b"J", txt=b" a red dog \n"))
    assert parts.kind == "caption" and parts.images == [b"J"]
    assert parts.conversations == turns("<image>", "a red dog")
    two = sample_parts(raw(None, **{"0.jpg": b"a", "1.jpg": b"b", "txt": b"c"}))
    assert two.conversations[0]["value"] == "<image>\n<image>"
    assert sample_parts(raw(None, txt=b"words only")).conversations == turns("", "words only")


@pytest.mark.parametrize(
    "members, expected",
    [
        ({"jpg": b"a", "png": b"b"}, "ambiguous images"),
        ({"jpg": b"a", "0.jpg": b"b"}, "ambiguous images"),
        ({"0.jpg": b"a", "00.png": b"b"}, "ambiguous images"),
        ({"jpg": b"a", "txt": b"   "}, "bad caption"),
        ({"jpg": b"a", "txt": b"\xff\xfe"}, "bad caption"),
        ({"jpg": b"a"}, "missing field"),  # neither conversation nor caption
    ],
)
def test_samples_that_cannot_be_read_name_the_reason(members, expected):
    assert reason(raw({"url": "u"}, **members)) == expected


def test_a_listed_image_that_is_absent_names_the_members_there_are():
    sample = raw({"conversations": turns("<image> q"), "images": ["jpg"]}, jpeg=b"J")
    with pytest.raises(BadSample, match=r"missing image: no tar member for \['jpg'\] \(image members: \['jpeg'\]\)"):
        sample_parts(sample)
    assert image_members(sample) == (["jpg"], ["jpeg"])
    with pytest.raises(BadSample, match="`images` must be a list"):
        image_members(raw({"images": "jpg"}))
