"""LLaVA JSON / JSONL + an image folder -> webdataset shards.

Input records: {"id", "image": "rel/path.jpg" | ["a.jpg", "b.jpg"] | absent (text-only),
"conversations": [{"from": "human" | "gpt", "value"}, ...]}, as in LLaVA-Pretrain-558K and
LLaVA-Instruct-665K. Image paths are relative to `image_root` (default: the JSON's folder).
"""

from __future__ import annotations

from pathlib import Path

from data_tools.convert_common import ConvertOptions, ListSource, RecordFormat, run_conversion
from data_tools.convert_records import as_list, check_conversation, read_json_records
from llava_train.data.errors import BadSample


class LlavaFormat(RecordFormat):
    def convert(self, row, index, load_image):
        if not isinstance(row, dict):
            raise BadSample("bad record", f"expected a JSON object, got {type(row).__name__}")
        paths = as_list(row.get("image"))
        if not all(isinstance(path, str) for path in paths):
            raise BadSample("bad record", "`image` must be a path or a list of paths")
        conversations = check_conversation(row.get("conversations"), len(paths))
        images = [load_image(path) for path in paths]
        meta = {"image": row["image"]} if paths else {}  # where the image came from
        return {"id": self.key(row, index), "conversations": conversations, "meta": meta}, images


def convert_llava(data_file: str | Path, options: ConvertOptions) -> dict:
    """Convert one LLaVA JSON or JSONL file; returns the summary (also in OUT/summary.json)."""
    if options.image_root is None:
        options.image_root = Path(data_file).parent
    records = read_json_records(data_file)
    if not isinstance(records, list):
        raise ValueError(f"{data_file} must hold a list of records (LLaVA JSON) or one record per line (JSONL)")
    return run_conversion(ListSource(records), LlavaFormat(), options, str(data_file))
