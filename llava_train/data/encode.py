"""Raw shard sample -> Example: check the record, encode the conversation, decode the images.

A preference-pair record ({prompt, chosen, rejected}) becomes a group: two Examples,
prompt + chosen and prompt + rejected, each a one-turn conversation with the same images.
"""

from __future__ import annotations

from llava_train.data.anyres import AnyResTiler
from llava_train.data.batch import IGNORE_INDEX, Example
from llava_train.data.errors import BadSample
from llava_train.data.images import ImageProcessor, decode_image
from llava_train.data.raw_sample import sample_parts
from llava_train.data.templates import IMAGE_TOKEN, USER, ConversationTemplate, Encoded, turn_role
from llava_train.data.visual_tokens import VisualTokens

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class SampleEncoder:
    """Callable used by ShardStream. Problems with one sample raise BadSample with a fixed
    reason (counted and logged by the stream): "missing field", "bad conversation",
    "missing image", "ambiguous images", "bad caption", "image count mismatch", "over-long",
    "undecodable image". Which record and image members make the sample: raw_sample.py.

    With an AnyRes `tiler`, each image becomes several (tiles + thumbnail), so its one
    `<image>` is expanded to as many consecutive image spans before the text is encoded.

    `visual_tokens` is the connector's count per image (an int, or its VisualTokens). A fixed
    count is expanded here; a count that varies with the step's budget leaves each span
    compact (one token, see Example) for collate to expand. Truncation always plans for the
    largest count, so no budget can push a sample past max_length, and never cuts a span.

    A preference pair needs `accept_groups` (the objective reads pairs): without it the first
    pair record is a fatal error, never trained on as something else.
    """

    def __init__(
        self,
        template: ConversationTemplate,
        image_processor: ImageProcessor,
        visual_tokens: VisualTokens | int,
        max_length: int,
        tiler: AnyResTiler | None = None,
        accept_groups: bool = False,
    ):
        self.template = template
        self.image_processor = image_processor
        self.visual = visual_tokens if isinstance(visual_tokens, VisualTokens) else VisualTokens.fixed(visual_tokens)
        self.num_image_tokens = self.visual.max_tokens  # what truncation plans for
        self.max_length = max_length
        self.tiler = tiler
        self.accept_groups = accept_groups

    def __call__(self, raw: dict) -> Example | list[Example]:
        pair = self._pair(raw)  # {"chosen": conversation, "rejected": conversation}, or None
        if pair is not None:  # the record checks below read one member; both share its prompt
            raw = {**raw, "json": {**raw["json"], "conversations": pair["chosen"]}}
        parts = sample_parts(raw)  # the conversation and its image bytes, placeholders checked
        record = raw.get("json") or {}
        if pair is None:
            members = {"": parts.conversations}
        else:
            members = {"chosen": parts.conversations, "rejected": [*parts.conversations[:-1], pair["rejected"][-1]]}
        encoded, images = self._encode_members(list(members.values()), parts.images)
        key = str(record.get("id") or raw.get("__key__", ""))
        examples = [
            Example(
                input_ids=ids,
                labels=labels,
                images=images,  # a group's members share the image tensors
                key=key,
                meta=dict(record.get("meta") or {}),
                source=str(raw.get("__source__", "")),
                image_slots=slots,
                group=key if pair else "",
                member=name,
            )
            for name, (ids, labels, slots) in zip(members, encoded)
        ]
        return examples if pair else examples[0]

    def _pair(self, raw: dict) -> dict[str, list[dict]] | None:
        """A preference pair's two conversations; None for a conversation record."""
        record = raw.get("json")
        if not isinstance(record, dict) or not any(name in record for name in ("chosen", "rejected")):
            return None
        if not self.accept_groups:
            raise ValueError(
                f"shard {raw.get('__shard__')} holds preference pairs (record {record.get('id', raw.get('__key__'))!r} "
                "has prompt/chosen/rejected), but this run's objective trains on single conversations; preference "
                "pairs need an objective that reads pairs (e.g. dpo): set stage.objective, or leave these shards out "
                "of data.train"
            )
        missing = [name for name in PAIR_FIELDS if not isinstance(record.get(name), str)]
        if missing:
            raise BadSample("missing field", f"a preference pair needs text fields {PAIR_FIELDS}; missing: {missing}")
        prompt = {"from": "human", "value": record["prompt"]}
        return {name: [prompt, {"from": "gpt", "value": record[name]}] for name in ("chosen", "rejected")}

    def _encode_members(self, members: list[list[dict]], image_bytes: list[bytes]):
        """Each member conversation -> (ids, labels, compact image slots), and the images they share."""
        if self.tiler is None:
            encoded = [self._encode(conversations) for conversations in members]
            # Only the images whose spans survived truncation are decoded.
            images = [self.image_processor(decode_image(data)) for data in image_bytes[: encoded[0].num_images]]
        else:
            decoded = [decode_image(data) for data in image_bytes]
            counts = [self.tiler.num_images(image.size) for image in decoded]
            encoded = [self._encode_tiled(conversations, counts) for conversations in members]
            kept = _whole_images(counts, encoded[0].num_images)
            images = [tile for image in decoded[:kept] for tile in self.tiler(image)]
        if any(e.num_images != encoded[0].num_images for e in encoded):
            raise BadSample("over-long", "max_length cuts the group's members at different images")
        return [self._compact(e) for e in encoded], images

    def _encode(self, conversations: list[dict]) -> Encoded:
        try:
            encoded = self.template.encode(conversations, self.num_image_tokens, self.max_length)
        except ValueError as err:  # e.g. a chat_template that rejects this turn order
            raise BadSample("bad conversation", str(err)) from None
        if encoded is None:
            raise BadSample("over-long", f"nothing supervised is left within max_length={self.max_length}")
        return encoded

    def _encode_tiled(self, conversations: list[dict], counts: list[int]) -> Encoded:
        encoded = self._encode(expand_placeholders(conversations, counts))
        return drop_partial_image(encoded, counts, self.num_image_tokens)

    def _compact(self, encoded: Encoded) -> tuple[list[int], list[int], tuple[int, ...]]:
        """(ids, labels, slots): a fixed count stays expanded; a varying one becomes one token per span."""
        if not self.visual.varies:
            return encoded.input_ids, encoded.labels, ()
        return compact_spans(encoded, self.template.image_token_id, self.num_image_tokens)


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


def compact_spans(encoded: Encoded, image_token_id: int, per_span: int) -> tuple[list[int], list[int], tuple[int, ...]]:
    """Each run of `per_span` image tokens -> one image token; returns (ids, labels, its positions). Image
    tokens come only from image spans (templates strip `<image>` from text), which are never supervised."""
    ids, labels, slots, at = [], [], [], 0
    while at < len(encoded.input_ids):
        if encoded.input_ids[at] == image_token_id:
            slots.append(len(ids))
            ids.append(image_token_id)
            labels.append(IGNORE_INDEX)
            at += per_span
        else:
            ids.append(encoded.input_ids[at])
            labels.append(encoded.labels[at])
            at += 1
    return ids, labels, tuple(slots)


def _whole_images(counts: list[int], spans: int) -> int:
    """How many images have all their spans among the first `spans`."""
    kept, total = 0, 0
    for count in counts:
        if total + count > spans:
            break
        kept, total = kept + 1, total + count
    return kept
