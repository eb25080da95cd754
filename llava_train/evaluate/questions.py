"""Held-out shard records -> questions: the prompt the model saw in training, and the answer.

The question is the conversation up to the last assistant turn, the reference answer is that
turn. The conversation is encoded exactly as for training (same template, image processing and
AnyRes tiling, see data/encode.py) and cut where the last answer's supervised tokens begin, so
the prompt is token for token the prefix the model was trained to continue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from llava_train.data.batch import IGNORE_INDEX, Example
from llava_train.data.encode import SampleEncoder, expand_placeholders
from llava_train.data.errors import BadSample
from llava_train.data.shards import ShardStream, expand_urls
from llava_train.data.templates import ASSISTANT, IMAGE_TOKEN, USER, strip_images, turn_role


class EvalInputError(ValueError):
    """Bad input to an evaluation, found before any model is built."""


@dataclass
class Question:
    example: Example  # prompt ids (nothing supervised) and preprocessed images
    question: str  # the last user turn, <image> removed (options of a multiple-choice question live here)
    reference: str
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.example.key


def read_records(shards: list[str] | str, limit: int | None = None) -> list[dict]:
    """Raw samples ({"json": record, <ext>: bytes, ...}) of the shards in file order, the first `limit`."""
    stream = ShardStream(expand_urls(shards), lambda raw: raw, shuffle=False, loop=False)
    records = []
    for raw in stream:
        if limit is not None and len(records) >= limit:
            break
        records.append(raw)
    return records


def check_meta_fields(records: list[dict], fields: list[str] | tuple[str, ...], shards) -> None:
    """Every record must have every breakdown field in its `meta`."""
    for name in fields:
        lacking = [raw for raw in records if name not in ((raw.get("json") or {}).get("meta") or {})]
        if lacking:
            have = sorted(set.intersection(*(set((r.get("json") or {}).get("meta") or {}) for r in records)))
            raise EvalInputError(
                f"{len(lacking)} of {len(records)} records in {shards} have no meta field {name!r} "
                f"(e.g. {lacking[0].get('__key__')}); break down by a field all records have "
                f"({', '.join(have) or 'none'}) or drop it"
            )


class QuestionEncoder:
    """Raw sample -> Question, with a training SampleEncoder (built without a length limit: the
    whole prompt is needed; one longer than `max_length` is skipped as over-long)."""

    def __init__(self, encoder: SampleEncoder, max_length: int):
        self.encoder = encoder
        self.max_length = max_length

    def __call__(self, raw: dict) -> Question:
        record = raw.get("json") or {}
        turns = record.get("conversations")
        if isinstance(turns, list):  # trailing turns after the last answer are no part of the question
            answers = [i for i, turn in enumerate(turns) if isinstance(turn, dict) and turn_role(turn) == ASSISTANT]
            if not answers:
                raise BadSample("no answer", "the conversation has no assistant turn to score against")
            raw = {**raw, "json": {**record, "conversations": turns[: answers[-1] + 1]}}
        example = self.encoder(raw)
        start = _last_answer_start(example.labels)
        if start > self.max_length:
            raise BadSample("over-long", f"the prompt has {start} tokens, over max_length={self.max_length}")
        prompt = Example(example.input_ids[:start], [IGNORE_INDEX] * start, example.images, example.key, example.meta)
        reference, question = _last_answer_and_question(raw)
        return Question(prompt, question, reference, example.meta)

    def from_text(self, text: str, images: list[Image.Image], key: str = "") -> Example:
        """A prompt from a question and PIL images (one `<image>` each, put in front when the text
        has none), as an lmms-eval request gives them."""
        if images and IMAGE_TOKEN not in text:
            text = "\n".join([IMAGE_TOKEN] * len(images) + [text])
        if text.count(IMAGE_TOKEN) != len(images):
            raise ValueError(f"the question has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} but {len(images)} images")
        images = [image.convert("RGB") for image in images]
        template, pixels = self.encoder.template, self.encoder.image_processor
        if self.encoder.tiler is not None:  # AnyRes: each image becomes tiles + thumbnail, one span each
            counts = [self.encoder.tiler.num_images(image.size) for image in images]
            text = expand_placeholders([{"from": "human", "value": text}], counts)[0]["value"]
            tensors = [tile for image in images for tile in self.encoder.tiler(image)]
        else:
            tensors = [pixels(image) for image in images]
        ids = template.prompt_ids(text, self.encoder.num_image_tokens, has_image=bool(images))
        return Example(ids, [IGNORE_INDEX] * len(ids), tensors, key)


def _last_answer_start(labels: list[int]) -> int:
    """Index of the first token of the last supervised run (the last answer)."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=None)
    if end is None:
        raise BadSample("no answer", "nothing in the conversation is supervised")
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def _last_answer_and_question(raw: dict) -> tuple[str, str]:
    turns = (raw.get("json") or {}).get("conversations")
    if not isinstance(turns, list):  # a caption sample (img2dataset .txt): the caption is the answer
        return raw["txt"].decode("utf-8").strip(), ""
    text = [str(t.get("value", t.get("content", ""))) for t in turns]
    users = [i for i, turn in enumerate(turns[:-1]) if turn_role(turn) == USER]
    question = strip_images(text[users[-1]]).strip() if users else ""
    return strip_images(text[-1]).strip(), question
