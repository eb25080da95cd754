"""A raw shard sample -> its conversation and its image bytes, in order.

Three layouts are read, so shards from other webdataset tools train without conversion:

- the project's (data_tools/shard_writer.py): `KEY.json` whose `images` lists the image members'
  extensions in order (`["jpg"]`, `["0.jpg", "1.png"]`, `[]` for text-only);
- a record with `conversations` but no `images` (e.g. `webdataset.ShardWriter` pipelines): the sample's
  image members are its images, `KEY.jpg` alone or `KEY.0.jpg, KEY.1.png, ...` in numeric order;
- a `KEY.txt` caption and no conversation (img2dataset: `KEY.jpg` + `KEY.txt` + `KEY.json` metadata):
  a LLaVA-Pretrain-style sample, `<image>` -> caption, meant for the `plain` template.

Image members are found by extension: jpg, jpeg, png, webp, optionally numbered. When the images come
from the members, a conversation with one image and no `<image>` at all gets `<image>\\n` in front of
its first user turn (LLaVA's layout, and what the converters do); any other disagreement between
placeholders and images is an "image count mismatch". Problems raise BadSample with a fixed reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llava_train.data.errors import BadSample
from llava_train.data.templates import IMAGE_TOKEN, USER, normalise, turn_role

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_NUMBERED = re.compile(r"(\d+)\.(?:" + "|".join(IMAGE_EXTS) + ")")


@dataclass
class SampleParts:
    conversations: list[dict]
    image_names: list[str]  # member extensions, in image order
    images: list[bytes]  # the members' bytes, in the same order
    unused: list[str]  # image members of the sample that are none of its images
    kind: str  # "conversation" or "caption"


def sample_parts(raw: dict) -> SampleParts:
    """The conversation and images of a raw sample ({"json": record, <ext>: bytes, ...}), checked
    against each other: as many `<image>` in the user turns as there are images."""
    names, unused = image_members(raw)
    missing = [name for name in names if name not in raw]
    if missing:
        present = [ext for ext in raw if _is_image(ext)]
        raise BadSample("missing image", f"no tar member for {missing} (image members: {present})")
    conversations, kind = _conversation(raw, len(names))
    try:
        _, turns = normalise(conversations)
    except ValueError as err:
        raise BadSample("bad conversation", str(err)) from None
    placeholders = sum(text.count(IMAGE_TOKEN) for role, text in turns if role == USER)
    if placeholders == 0 and len(names) == 1 and turns and "images" not in _record(raw):
        conversations = _prepend_image(conversations)
        placeholders = 1
    if placeholders != len(names):
        raise BadSample("image count mismatch", f"{placeholders} {IMAGE_TOKEN} in the text, {len(names)} images")
    return SampleParts(conversations, names, [raw[name] for name in names], unused, kind)


def image_members(raw: dict) -> tuple[list[str], list[str]]:
    """(the sample's images as member extensions in order, its image members left out of them).

    The record's `images` list wins where there is one; otherwise the image members are the images."""
    record = _record(raw)
    present = [ext for ext in raw if _is_image(ext)]
    if "images" in record:
        listed = record["images"]
        if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
            raise BadSample("missing field", "`images` must be a list of member extensions")
        # Member extensions are lower-cased by the reader, as webdataset does.
        names = [name if name in raw else name.lower() for name in listed]
        return names, [ext for ext in present if ext not in names]
    return _ordered(present), []


def _ordered(present: list[str]) -> list[str]:
    single = sorted(ext for ext in present if ext in IMAGE_EXTS)
    numbered = sorted((int(_NUMBERED.fullmatch(ext).group(1)), ext) for ext in present if ext not in IMAGE_EXTS)
    numbers = [n for n, _ in numbered]
    if len(single) > 1 or (single and numbered) or len(set(numbers)) < len(numbers):
        raise BadSample(
            "ambiguous images",
            f"image members {single + [ext for _, ext in numbered]} have no order; name one image KEY.jpg, several "
            "KEY.0.jpg, KEY.1.jpg, ..., or list them in the record's `images`",
        )
    return single + [ext for _, ext in numbered]


def _conversation(raw: dict, num_images: int) -> tuple[list[dict], str]:
    record = _record(raw)
    if "conversations" in record:
        if not isinstance(record["conversations"], list):
            raise BadSample("missing field", "`conversations` must be a list of turns")
        return record["conversations"], "conversation"
    if "txt" not in raw:
        raise BadSample("missing field", "the record has no `conversations` list and the sample no .txt caption")
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise BadSample("bad caption", f".txt is not UTF-8: {err}") from None
    if not caption:
        raise BadSample("bad caption", "the .txt caption is empty")
    question = "\n".join([IMAGE_TOKEN] * num_images)
    return [{"from": "human", "value": question}, {"from": "gpt", "value": caption}], "caption"


def _prepend_image(conversations: list[dict]) -> list[dict]:
    out, done = [], False
    for turn in conversations:
        if not done and turn_role(turn) == USER:
            key = "value" if "value" in turn else "content"
            turn, done = {**turn, key: f"{IMAGE_TOKEN}\n{turn[key]}"}, True
        out.append(turn)
    return out


def _record(raw: dict) -> dict:
    record = raw.get("json")
    return record if isinstance(record, dict) else {}


def _is_image(ext: str) -> bool:
    return ext in IMAGE_EXTS or _NUMBERED.fullmatch(ext) is not None
