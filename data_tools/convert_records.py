"""The per-record pieces every converter shares: reading JSON inputs, loading and resizing
images, checking conversations, and laying a record out as tar members.

Each check raises BadSample with a fixed reason, so the converter counts it and moves on.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from llava_train.data.errors import BadSample
from llava_train.data.images import decode_image
from llava_train.data.templates import ASSISTANT, IMAGE_TOKEN, USER, normalise

# PIL format -> member extension. MPO is what many phone cameras write: a JPEG with extra frames.
IMAGE_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
JPEG_QUALITY = 95


# ----------------------------------------------------------------------------- inputs


def read_json_records(path: str | Path) -> list:
    """A JSON list or a JSONL file (one object per line), told apart by the first character.

    A JSONL line that does not parse becomes a BadSample in the list, so that one line is
    skipped and counted instead of failing the whole run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); fix the file or write it as JSONL") from None
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            records.append(BadSample("bad json", f"{path.name} line {number}: {err}"))
    return records


def as_list(value) -> list:
    """An image field: absent -> [], one value -> [value], a list -> itself."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ----------------------------------------------------------------------------- images


class ImageLoader:
    """Turns an image reference (path, bytes, {"bytes", "path"} dict or PIL image) into
    (extension, encoded bytes), fully decoded once to prove it is readable.

    With `max_size`, an image whose longest side is larger is shrunk to it (aspect kept) and
    re-encoded: PNG stays PNG (it may be a lossless diagram), everything else becomes
    JPEG q=95. Smaller images keep their original bytes, untouched."""

    def __init__(self, image_root: str | Path | None = None, max_size: int | None = None):
        self.image_root = Path(image_root) if image_root is not None else None
        self.max_size = max_size

    def __call__(self, value) -> tuple[str, bytes]:
        data = self._read(value)
        image = decode_image(data)  # BadSample("undecodable image") for a corrupt file
        ext = IMAGE_EXT.get(image.format, str(image.format).lower())
        if self.max_size and max(image.size) > self.max_size:
            return self._shrink(image)
        return ext, data

    def _read(self, value) -> bytes:
        if isinstance(value, dict):  # a Hugging Face Image feature read without decoding
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            return buffer.getvalue()
        if not isinstance(value, str) or not value:
            raise BadSample("missing image", f"expected a path, bytes or image, got {type(value).__name__}")
        path = Path(value)
        if not path.is_absolute() and self.image_root is not None:
            path = self.image_root / path
        try:
            return path.read_bytes()
        except OSError as err:
            raise BadSample("missing image", f"{path}: {err.strerror or err}") from None

    def _shrink(self, image: Image.Image) -> tuple[str, bytes]:
        scale = self.max_size / max(image.size)
        size = tuple(max(1, round(side * scale)) for side in image.size)
        keep_png = image.format == "PNG"
        small = image.resize(size, resample=Image.Resampling.LANCZOS)
        if not keep_png and small.mode not in ("RGB", "L"):
            small = small.convert("RGB")  # JPEG has no alpha or palette
        buffer = io.BytesIO()
        if keep_png:
            small.save(buffer, format="PNG")
        else:
            small.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return ("png" if keep_png else "jpg"), buffer.getvalue()


# ----------------------------------------------------------------------------- text


def check_conversation(conversations, num_images: int) -> list:
    """The conversation, if a template can train on it with `num_images` images."""
    if isinstance(conversations, str):  # some parquet exports store the turns as a JSON string
        try:
            conversations = json.loads(conversations)
        except ValueError as err:
            raise BadSample("bad conversation", f"the conversation string is not JSON: {err}") from None
    if not isinstance(conversations, list) or not all(isinstance(turn, dict) for turn in conversations):
        raise BadSample("bad conversation", "expected a list of {from, value} turns")
    try:
        _, turns = normalise(conversations)
    except ValueError as err:
        raise BadSample("bad conversation", str(err)) from None
    answers = [text for role, text in turns if role == ASSISTANT]
    if not answers or any(not text.strip() for text in answers):
        raise BadSample("empty answer", "an assistant turn is empty" if answers else "no assistant turn")
    check_placeholders(sum(text.count(IMAGE_TOKEN) for role, text in turns if role == USER), num_images)
    return conversations


def check_placeholders(placeholders: int, num_images: int) -> None:
    if num_images and not placeholders:
        raise BadSample("no <image> placeholder", f"{num_images} image(s) given, no {IMAGE_TOKEN} in the user text")
    if placeholders != num_images:
        raise BadSample("image count mismatch", f"{placeholders} {IMAGE_TOKEN} in the user text, {num_images} images")


def with_placeholder(prompt: str, num_images: int) -> str:
    """A single-string prompt (a question column, a preference prompt) gets `<image>\\n` in
    front when it has an image but no placeholder, as LLaVA lays out its prompts."""
    if num_images and IMAGE_TOKEN not in prompt:
        return IMAGE_TOKEN * num_images + "\n" + prompt
    return prompt


# ----------------------------------------------------------------------------- members


def record_members(key: str, record: dict, images: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Tar members of one sample, in shard_writer's layout: KEY.json listing the image members'
    extensions ("jpg" for one image; "0.jpg", "1.png", ... for several), then the images."""
    exts = [ext if len(images) == 1 else f"{i}.{ext}" for i, (ext, _) in enumerate(images)]
    record = {**record, "images": exts}
    members = [(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())]
    return members + [(f"{key}.{ext}", data) for ext, (_, data) in zip(exts, images)]
