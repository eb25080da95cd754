"""Raw shard sample -> Example: check the record, encode the conversation, decode the images."""

from __future__ import annotations

from llava_train.data.batch import Example
from llava_train.data.errors import BadSample
from llava_train.data.images import ImageProcessor, decode_image
from llava_train.data.templates import IMAGE_TOKEN, ConversationTemplate, normalise


class SampleEncoder:
    """Callable used by ShardStream. Problems with one sample raise BadSample with a fixed
    reason (counted and logged by the stream): "missing field", "bad conversation",
    "missing image", "image count mismatch", "over-long", "undecodable image"."""

    def __init__(
        self, template: ConversationTemplate, image_processor: ImageProcessor, num_image_tokens: int, max_length: int
    ):
        self.template = template
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length

    def __call__(self, raw: dict) -> Example:
        record = raw.get("json")
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise BadSample("missing field", "the record has no `conversations` list")
        conversations = record["conversations"]
        exts = record.get("images") or []
        if not isinstance(exts, list) or not all(isinstance(ext, str) for ext in exts):
            raise BadSample("missing field", "`images` must be a list of member extensions")
        missing = [ext for ext in exts if ext not in raw]
        if missing:
            raise BadSample("missing image", f"no tar member for {missing}")
        try:
            _, turns = normalise(conversations)
        except ValueError as err:
            raise BadSample("bad conversation", str(err)) from None
        placeholders = sum(text.count(IMAGE_TOKEN) for role, text in turns if role == "user")
        if placeholders != len(exts):
            raise BadSample("image count mismatch", f"{placeholders} {IMAGE_TOKEN} in the text, {len(exts)} images")
        try:
            encoded = self.template.encode(conversations, self.num_image_tokens, self.max_length)
        except ValueError as err:  # e.g. a chat_template that rejects this turn order
            raise BadSample("bad conversation", str(err)) from None
        if encoded is None:
            raise BadSample("over-long", f"nothing supervised is left within max_length={self.max_length}")
        # Only the images whose spans survived truncation are decoded.
        images = [self.image_processor(decode_image(raw[ext])) for ext in exts[: encoded.num_images]]
        return Example(
            input_ids=encoded.input_ids,
            labels=encoded.labels,
            images=images,
            key=str(record.get("id") or raw.get("__key__", "")),
            meta=dict(record.get("meta") or {}),
        )
