"""`data convert-pairs` reads the common preference layouts from local files: ours / HF (prompt, chosen, rejected,
image or images), RLAIF-V's parquet (question, image bytes, idx) and TRL's conversational message lists."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.convert_common import ConvertOptions
from data_tools.convert_pairs import convert_pairs
from llava_train.cli import main
from llava_train.data.shards import expand_urls
from tests.test_converters import jpeg, read_records


def image_members(folder) -> list[bytes]:
    found = []
    for url in expand_urls(str(folder)):
        with tarfile.open(url) as tar:
            found += [tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".json")]
    return found


def convert(tmp_path, path):
    summary = convert_pairs(path, ConvertOptions(tmp_path / "out", progress=False))
    return summary, read_records(tmp_path / "out")


def test_rlaif_v_parquet(tmp_path):
    """openbmb/RLAIF-V-Dataset's columns, the image as the HF Image feature's {bytes, path} struct."""
    rows = [{"ds_name": "RLAIF-V", "image": {"bytes": jpeg(colour=(0, 0, 200 - i)), "path": f"{i}.jpg"},
             "question": f"Describe image {i}.", "chosen": "A blue square.", "rejected": "A red circle and a dog.",
             "origin_dataset": "coco", "origin_split": "train", "idx": 100 + i, "image_path": f"{i}.jpg"}
            for i in range(3)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rlaif.parquet")
    summary, records = convert(tmp_path, tmp_path / "rlaif.parquet")
    assert summary["written"] == 3
    assert records[0] == {"id": "100", "prompt": "<image>\nDescribe image 0.", "chosen": "A blue square.",
                          "rejected": "A red circle and a dog.", "images": ["jpg"], "meta": {}}  # fmt: skip
    assert image_members(tmp_path / "out")[1] == rows[1]["image"]["bytes"]


@pytest.mark.parametrize("suffix", ["json", "parquet"])
def test_hf_prompt_chosen_rejected_with_image_paths_or_images(tmp_path, suffix):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    rows = [
        {"id": "one", "prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.", "image": "a.jpg"},
        {"id": "two", "prompt": "<image>\nLeft, <image>\nright: same?", "chosen": "Yes.", "rejected": "No.",
         "images": [{"bytes": jpeg(), "path": None}, {"bytes": jpeg(colour=(0, 200, 0)), "path": None}]},
        {"id": "three", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
    ]
    if suffix == "json":
        for image in rows[1]["images"]:  # JSON holds no bytes: the same images as files
            image["path"] = f"{len(list(tmp_path.glob('*.jpg')))}.jpg"
            (tmp_path / image["path"]).write_bytes(image.pop("bytes"))
        rows[1]["images"] = [image["path"] for image in rows[1]["images"]]
        (tmp_path / "pairs.json").write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist([rows[1]]), tmp_path / "two.parquet")  # one schema per file
        pq.write_table(pa.Table.from_pylist([rows[0], rows[2]]), tmp_path / "pairs.parquet")
    files = [tmp_path / "pairs.json"] if suffix == "json" else [tmp_path / "pairs.parquet", tmp_path / "two.parquet"]
    summary, records = convert(tmp_path, files)
    assert summary["written"] == 3
    by_id = {r["id"]: r for r in records}
    assert by_id["one"]["prompt"] == "<image>\nWhat colour?" and by_id["one"]["images"] == ["jpg"]
    assert by_id["two"]["images"] == ["0.jpg", "1.jpg"] and by_id["two"]["prompt"].count("<image>") == 2
    assert by_id["three"]["images"] == [] and by_id["three"]["rejected"] == "Go away."


def test_trl_conversational_layout(tmp_path):
    """TRL's vision preference layout (e.g. HuggingFaceH4/rlaif-v_formatted): message lists, `images`."""
    row = {
        "prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                {"type": "text", "text": "What is shown?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A square."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
        "images": [{"bytes": jpeg(), "path": None}],
        "token_weights": {"chosen": [1.0, 5.0], "rejected": [1.0, 5.0]},
    }  # fmt: skip
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "trl.parquet")
    summary, (record,) = convert(tmp_path, tmp_path / "trl.parquet")
    assert summary["written"] == 1
    assert (record["prompt"], record["chosen"], record["rejected"]) == ("<image>What is shown?", "A square.", "A cat.")
    assert record["meta"] == {"token_weights": row["token_weights"]} and record["images"] == ["jpg"]


def test_cli_takes_several_files(tmp_path, capsys):
    for i in range(2):
        rows = [{"id": f"{i}-{j}", "question": "Q?", "chosen": "A.", "rejected": "B."} for j in range(2)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"part-{i}.parquet")
    args = ["data", "convert-pairs", str(tmp_path / "part-0.parquet"), str(tmp_path / "part-1.parquet")]
    assert main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert [r["id"] for r in read_records(tmp_path / "out")] == ["0-0", "0-1", "1-0", "1-1"]
