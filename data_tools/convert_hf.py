"""Hugging Face `datasets` input -> shards: a folder written by `save_to_disk`, or
parquet / JSON / JSONL / arrow files.

Rows are read in Arrow form, so an Image column arrives as its stored {"bytes", "path"}
and the original encoded bytes go into the shard without a decode/re-encode round trip.
An image cell may also be raw bytes, a path (relative to the image root), or a list of
these; an empty cell means a text-only row. The text comes from a conversations column
(LLaVA `from`/`value` or OpenAI `role`/`content` turns) or, failing that, from
question/answer columns turned into one exchange.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from data_tools.convert_common import ConvertOptions, RecordFormat, run_conversion
from data_tools.convert_records import as_list, check_conversation, with_placeholder
from llava_train.data.errors import BadSample

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


@dataclass
class Columns:
    image: str | None = None  # None: the `image` column if there is one, else a text-only dataset
    conversations: str = "conversations"
    question: str = "question"
    answer: str = "answer"
    id: str = "id"


class HFSource:
    """Rows of a datasets.Dataset as plain dicts, images undecoded. Picklable: a dataset
    backed by Arrow files pickles as their paths."""

    def __init__(self, dataset):
        self.dataset = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, start: int, stop: int) -> list[dict]:
        return self.dataset[start:stop].to_pylist()


class HFFormat(RecordFormat):
    def __init__(self, columns: Columns, use_conversations: bool, image_column: str | None):
        self.columns = columns
        self.id_field = columns.id
        self.use_conversations = use_conversations
        self.image_column = image_column

    def convert(self, row, index, load_image):
        values = self._image_values(row)
        if self.use_conversations:
            conversations = check_conversation(row.get(self.columns.conversations), len(values))
        else:
            conversations = check_conversation(self._exchange(row, len(values)), len(values))
        images = [load_image(value) for value in values]
        return {"id": self.key(row, index), "conversations": conversations, "meta": {}}, images

    def _image_values(self, row: dict) -> list:
        if self.image_column is None:
            return []
        return [value for value in as_list(row.get(self.image_column)) if not _empty_image(value)]

    def _exchange(self, row: dict, num_images: int) -> list[dict]:
        question, answer = row.get(self.columns.question), row.get(self.columns.answer)
        if not isinstance(question, str) or not isinstance(answer, str):
            raise BadSample("missing field", f"`{self.columns.question}` and `{self.columns.answer}` must be text")
        return [{"from": "human", "value": with_placeholder(question, num_images)}, {"from": "gpt", "value": answer}]


def _empty_image(value) -> bool:
    # A stored-null Image cell reads as None or as {"bytes": None, "path": None}.
    return value is None or (isinstance(value, dict) and not value.get("bytes") and not value.get("path"))


def load_hf_dataset(inputs: list[str], split: str = "train", cache_dir: str | None = None):
    """A saved dataset folder, or data files (globs allowed) of one format."""
    import datasets

    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        folder = Path(inputs[0])
        if not any((folder / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
            raise ValueError(
                f"{folder} is not a folder written by Dataset.save_to_disk (no dataset_info.json); "
                "pass its parquet/JSON files instead, e.g. 'DIR/*.parquet'"
            )
        loaded = datasets.load_from_disk(str(folder))
        return _pick_split(loaded, split, folder)
    files = _expand(inputs)
    kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"input files must all be one of {', '.join(BUILDERS)}; got {sorted(map(str, files))[:5]}")
    return datasets.load_dataset(kinds.pop(), data_files=files, split="train", cache_dir=cache_dir)


def _expand(inputs: list[str]) -> list[str]:
    files = []
    for pattern in inputs:
        if glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
        else:
            found = [pattern] if Path(pattern).is_file() else []
        if not found:
            raise FileNotFoundError(f"no input file matches {pattern!r}")
        files += found
    return files


def _pick_split(loaded, split: str, folder: Path):
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split not in loaded:
        raise ValueError(f"{folder} has splits {sorted(loaded)}, not {split!r}; choose one with --split")
    return loaded[split]


def choose_format(column_names: list[str], columns: Columns) -> HFFormat:
    """Conversations if that column exists, else question/answer; otherwise name the fix."""
    if columns.conversations in column_names:
        use_conversations = True
    elif columns.question in column_names and columns.answer in column_names:
        use_conversations = False
    else:
        raise ValueError(
            f"the dataset has columns {column_names} but no {columns.conversations!r} column and no "
            f"{columns.question!r} + {columns.answer!r} columns; name them with --conversations-column "
            "or --question-column/--answer-column"
        )
    return HFFormat(columns, use_conversations, _image_column(column_names, columns.image))


def _image_column(column_names: list[str], named: str | None) -> str | None:
    if named is None:
        return "image" if "image" in column_names else None
    if named not in column_names:
        raise ValueError(f"--image-column {named!r} is not a column of the dataset; it has {column_names}")
    return named


def convert_hf(
    inputs: list[str] | str,
    options: ConvertOptions,
    columns: Columns | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> dict:
    """Convert a Hugging Face dataset; returns the summary (also in OUT/summary.json)."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    inputs = [str(i) for i in inputs]
    dataset = load_hf_dataset(inputs, split, cache_dir)
    fmt = choose_format(dataset.column_names, columns or Columns())
    return run_conversion(HFSource(dataset), fmt, options, " ".join(inputs))
