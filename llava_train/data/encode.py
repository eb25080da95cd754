"""Raw shard sample -> Example: check the record, encode the conversation, decode the images."""

from __future__ import annotations

from PIL import Image

from llava_train.data.anyres import AnyResTiler
from llava_train.data.batch import IGNORE_INDEX, Example
from llava_train.data.errors import BadSample
from llava_train.data.images import ImageProcessor, decode_image
from llava_train.data.raw_sample import sample_parts
from llava_train.data.templates import IMAGE_TOKEN, USER, ConversationTemplate, Encoded, turn_role


class SampleEncoder:
    """Callable used by ShardStream. Problems with one sample raise BadSample with a fixed
    reason (counted and logged by the stream): "missing field", "bad conversation",
    "missing image", "ambiguous images", "bad caption", "image count mismatch", "over-long",
    "undecodable image". Which record and image members make the sample: raw_sample.py.

    With an AnyRes `tiler`, each image becomes several (tiles + thumbnail), so its one
    `<image>` is expanded to as many consecutive image spans before the text is encoded.
    """

    def __init__(
        self,
        template: ConversationTemplate,
        image_processor: ImageProcessor,
        num_image_tokens: int,
        max_length: int,
        tiler: AnyResTiler | None = None,
    ):
        self.template = template
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.tiler = tiler

    def __call__(self, raw: dict) -> Example:
        parts = sample_parts(raw)  # the conversation and its image bytes, placeholders checked
        record, conversations = raw.get("json") or {}, parts.conversations
        if self.tiler is None:
            encoded = self._encode(conversations)
            # Only the images whose spans survived truncation are decoded.
            images = [self.image_processor(decode_image(data)) for data in parts.images[: encoded.num_images]]
        else:
            encoded, images = self._encode_tiled(conversations, [decode_image(data) for data in parts.images])
        return Example(
            input_ids=encoded.input_ids,
            labels=encoded.labels,
            images=images,
            key=str(record.get("id") or raw.get("__key__", "")),
            meta=dict(record.get("meta") or {}),
            source=str(raw.get("__source__", "")),
        )

    def _encode(self, conversations: list[dict]) -> Encoded:
        try:
            encoded = self.template.encode(conversations, self.num_image_tokens, self.max_length)
        except ValueError as err:  # e.g. a chat_template that rejects this turn order
            raise BadSample("bad conversation", str(err)) from None
        if encoded is None:
            raise BadSample("over-long", f"nothing supervised is left within max_length={self.max_length}")
        return encoded

    def _encode_tiled(self, conversations: list[dict], decoded: list[Image.Image]):
        counts = [self.tiler.num_images(image.size) for image in decoded]
        encoded = self._encode(expand_placeholders(conversations, counts))
        encoded = drop_partial_image(encoded, counts, self.num_image_tokens)
        kept = _whole_images(counts, encoded.num_images)
        return encoded, [tile for image in decoded[:kept] for tile in self.tiler(image)]


def expand_placeholders(conversations: list[dict], counts: list[int]) -> list[dict]:
    """The k-th `<image>` of the user turns -> counts[k] `<image>`s in a row (no text between them)."""
    remaining = iter(counts)
    expanded = []
    for turn in conversations:
        role = turn_role(turn)
        key = "value" if "value" in turn else "content"
        if role != USER or IMAGE_TOKEN not in str(turn.get(key, "")):
            expanded.append(turn)
            continue
        parts = turn[key].split(IMAGE_TOKEN)
        text = parts[0] + "".join(IMAGE_TOKEN * next(remaining) + part for part in parts[1:])
        expanded.append({**turn, key: text})
    return expanded


def drop_partial_image(encoded: Encoded, counts: list[int], tokens_per_image: int) -> Encoded:
    """Truncation keeps whole spans, but may keep only some of one image's tiles: drop those too.

    The tiles of one image are consecutive spans with nothing between them, so a cut inside
    an image's tiles leaves them at the very end of the ids."""
    kept = _whole_images(counts, encoded.num_images)
    partial = encoded.num_images - sum(counts[:kept])
    if partial == 0:
        return encoded
    cut = len(encoded.input_ids) - partial * tokens_per_image
    labels = encoded.labels[:cut]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise BadSample("over-long", "nothing supervised is left once an image's tiles cut by max_length are dropped")
    return Encoded(encoded.input_ids[:cut], labels, encoded.num_images - partial)


def _whole_images(counts: list[int], spans: int) -> int:
    """How many images have all their spans among the first `spans`."""
    kept, total = 0, 0
    for count in counts:
        if total + count > spans:
            break
        kept, total = kept + 1, total + count
    return kept
