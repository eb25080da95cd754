"""Preference pairs (prompt, image, chosen, rejected) from local JSON / JSONL / parquet files -> shards for DPO.

Input layouts (one row per pair; told apart per row by its field names):
- ours / the common Hugging Face layout: `prompt`, `chosen`, `rejected`, and `image` (one) or `images` (a list);
- RLAIF-V (openbmb/RLAIF-V-Dataset's parquet): `question` instead of `prompt`, `image` as {"bytes", "path"},
  `idx` as the id;
- TRL's conversational layout (e.g. HuggingFaceH4/rlaif-v_formatted): `prompt`, `chosen`, `rejected` as message
  lists ({"role", "content": text or [{"type": "text", "text"}, {"type": "image"}]}), `images` a list; an image
  part becomes `<image>`, the prompt is the last user message, an answer the last assistant message.
An image is a path (relative to --image-root), bytes, or a {"bytes", "path"} dict. An optional `token_weights`
({"chosen": [...], "rejected": [...]}, one per response token) is kept in meta for dense DPO (`dense.weights: data`).

Shard record: {"id", "prompt", "chosen", "rejected", "images": [member exts], "meta"}; a prompt with an image but
no `<image>` gets `<image>\\n` in front.
"""

from __future__ import annotations

from pathlib import Path

from data_tools.convert_common import ConvertOptions, ListSource, RecordFormat, run_conversion
from data_tools.convert_records import as_list, check_placeholders, read_json_records, with_placeholder
from llava_train.data.errors import BadSample
from llava_train.data.templates import IMAGE_TOKEN

FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt", "question")  # question: RLAIF-V
IMAGE_FIELDS = ("image", "images")


def message_text(value, role: str):
    """A field's text: a string as is; in a message list, the last `role` message's text (image parts -> <image>)."""
    if not isinstance(value, list):
        return value
    messages = [m for m in value if isinstance(m, dict) and m.get("role") == role]
    if not messages:
        return None
    content = messages[-1].get("content")
    if isinstance(content, list):
        return "".join(IMAGE_TOKEN if part.get("type") == "image" else part.get("text") or "" for part in content)
    return content


class PairsFormat(RecordFormat):
    def key(self, row, index: int) -> str:
        value = next((row[k] for k in ("id", "idx") if isinstance(row, dict) and row.get(k) is not None), None)
        return str(value) if value is not None else f"row-{index:09d}"

    def convert(self, row, index, load_image):
        if not isinstance(row, dict):
            raise BadSample("bad record", f"expected a JSON object, got {type(row).__name__}")
        prompt = message_text(next((row[k] for k in PROMPT_FIELDS if k in row), None), "user")
        chosen, rejected = (message_text(row.get(name), "assistant") for name in ("chosen", "rejected"))
        texts = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        missing = [name for name, text in texts.items() if not isinstance(text, str)]
        if missing:
            raise BadSample("missing field", f"needs text fields {', '.join(FIELDS)} (or question); missing or not "
                                             f"text: {missing}")
        images = [value for name in IMAGE_FIELDS for value in as_list(row.get(name))]
        if not all(isinstance(image, (str, bytes, dict)) for image in images):
            raise BadSample("bad record", "an image must be a path, bytes or a {bytes, path} dict")
        prompt = with_placeholder(prompt, len(images))
        check_placeholders(prompt.count(IMAGE_TOKEN), len(images))
        if not chosen.strip() or not rejected.strip():
            raise BadSample("empty answer", "`chosen` or `rejected` is empty")
        if chosen.strip() == rejected.strip():
            raise BadSample("identical pair", "`chosen` equals `rejected`: the pair teaches nothing")
        loaded = [load_image(image) for image in images]
        meta = {"image": row["image"]} if isinstance(row.get("image"), str) else {}
        if row.get("token_weights") is not None:
            meta["token_weights"] = row["token_weights"]
        record = {"id": self.key(row, index), "prompt": prompt, "chosen": chosen, "rejected": rejected}
        return {**record, "meta": meta}, loaded


def read_pair_rows(path: str | Path) -> list:
    """Rows of a JSON list, JSONL or parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"input file {str(path)!r} does not exist")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = read_json_records(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path} must hold a list of pair records (JSON) or one per line (JSONL)")
    return rows


def convert_pairs(data_files: str | Path | list, options: ConvertOptions) -> dict:
    """Convert preference-pair files (JSON, JSONL or parquet; several are read in order); returns the summary."""
    files = [Path(f) for f in (data_files if isinstance(data_files, (list, tuple)) else [data_files])]
    if options.image_root is None:
        options.image_root = files[0].parent
    rows = [row for path in files for row in read_pair_rows(path)]
    return run_conversion(ListSource(rows), PairsFormat(), options, ", ".join(map(str, files)))
