"""Preference pairs (prompt, image, chosen, rejected) from JSON / JSONL -> shards for DPO.

Input records: {"id", "prompt", "chosen", "rejected", "image": path | [paths] | absent}.
Shard record: {"id", "prompt", "chosen", "rejected", "images": [member exts], "meta"}; a
prompt with an image but no `<image>` gets `<image>\\n` in front.
"""

from __future__ import annotations

from pathlib import Path

from data_tools.convert_common import ConvertOptions, ListSource, RecordFormat, run_conversion
from data_tools.convert_records import as_list, check_placeholders, read_json_records, with_placeholder
from llava_train.data.errors import BadSample
from llava_train.data.templates import IMAGE_TOKEN

FIELDS = ("prompt", "chosen", "rejected")


class PairsFormat(RecordFormat):
    def convert(self, row, index, load_image):
        if not isinstance(row, dict):
            raise BadSample("bad record", f"expected a JSON object, got {type(row).__name__}")
        missing = [name for name in FIELDS if not isinstance(row.get(name), str)]
        if missing:
            raise BadSample("missing field", f"needs string fields {', '.join(FIELDS)}; missing or not text: {missing}")
        paths = as_list(row.get("image"))
        if not all(isinstance(path, str) for path in paths):
            raise BadSample("bad record", "`image` must be a path or a list of paths")
        prompt = with_placeholder(row["prompt"], len(paths))
        check_placeholders(prompt.count(IMAGE_TOKEN), len(paths))
        chosen, rejected = row["chosen"], row["rejected"]
        if not chosen.strip() or not rejected.strip():
            raise BadSample("empty answer", "`chosen` or `rejected` is empty")
        if chosen.strip() == rejected.strip():
            raise BadSample("identical pair", "`chosen` equals `rejected`: the pair teaches nothing")
        images = [load_image(path) for path in paths]
        record = {"id": self.key(row, index), "prompt": prompt, "chosen": chosen, "rejected": rejected}
        return {**record, "meta": {"image": row["image"]} if paths else {}}, images


def convert_pairs(data_file: str | Path, options: ConvertOptions) -> dict:
    """Convert one preference-pair JSON or JSONL file; returns the summary."""
    if options.image_root is None:
        options.image_root = Path(data_file).parent
    records = read_json_records(data_file)
    if not isinstance(records, list):
        raise ValueError(f"{data_file} must hold a list of pair records (JSON) or one per line (JSONL)")
    return run_conversion(ListSource(records), PairsFormat(), options, str(data_file))
