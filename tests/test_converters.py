"""Converters (LLaVA JSON, HF datasets, preference pairs) -> shards, shard inspection, and the CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_tools.convert_common import ConvertOptions
from data_tools.convert_hf import Columns, convert_hf
from data_tools.convert_llava import convert_llava
from data_tools.convert_pairs import convert_pairs
from data_tools.inspect_shards import inspect
from data_tools.shard_writer import ShardSink
from data_tools.shard_writer import sample_members, write_shards
from data_tools.tokenizer import train_tokenizer
from llava_train.cli import main
from llava_train.data.encode import SampleEncoder
from llava_train.data.images import ImageProcessor
from llava_train.data.shards import ShardStream, expand_urls
from llava_train.data.templates import ensure_image_token, get_template


def turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def jpeg(size=(24, 16), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def png(size=(20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", size, (30, 30, 200, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


# The ids of the LLaVA input that must be written, in input order, and those that must be skipped.
GOOD = ["red", "wide", "diagram", "pair", "chat", "green", "blue"]
SKIPPED = {
    "missing image": ["missing"],
    "undecodable image": ["corrupt"],
    "no <image> placeholder": ["no-placeholder"],
    "image count mismatch": ["too-many"],
    "empty answer": ["empty"],
}


@pytest.fixture(scope="module")
def llava_input(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llava")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    (images / "red.jpg").write_bytes(jpeg())
    (images / "sub" / "wide.jpg").write_bytes(jpeg((120, 40), (30, 200, 30)))
    (images / "diagram.png").write_bytes(png((90, 30)))
    (images / "corrupt.jpg").write_bytes(jpeg()[:40])  # a JPEG header cut short
    records = [
        {"id": "red", "image": "red.jpg", "conversations": turns("<image>\nWhat colour?", "Red.")},
        {"id": "missing", "image": "gone.jpg", "conversations": turns("<image>\nWhat?", "Something.")},
        {"id": "wide", "image": "sub/wide.jpg", "conversations": turns("<image>\nDescribe it.", "A green band.")},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": turns("<image>\nWhat?", "Something.")},
        {"id": "diagram", "image": "diagram.png", "conversations": turns("Read <image>", "A blue box.")},
        {"id": "no-placeholder", "image": "red.jpg", "conversations": turns("What colour?", "Red.")},
        {"id": "pair", "image": ["red.jpg", "diagram.png"], "conversations": turns("<image>\n<image>\nSame?", "No.")},
        {"id": "too-many", "image": "red.jpg", "conversations": turns("<image> <image>", "Red.")},
        {"id": "empty", "image": "red.jpg", "conversations": turns("<image>\nWhat colour?", "  ")},
        {"id": "chat", "conversations": turns("Hello there.", "Hello! How can I help?")},
        {"id": "green", "image": "sub/wide.jpg", "conversations": turns("<image>\nColour?", "Green.")},
        {"id": "blue", "image": "diagram.png", "conversations": turns("<image>\nColour?", "Blue.")},
    ]
    (root / "data.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    texts = ["What colour? Red green blue. Describe it. A band box. Hello there! How can I help? Same? No."] * 20
    train_tokenizer(texts, out, vocab_size=300)
    return out


def run_llava(llava_input: Path, out: Path, **options) -> dict:
    options = ConvertOptions(out, image_root=llava_input / "images", progress=False, **options)
    return convert_llava(llava_input / "data.json", options)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".tar" or p.name == "index.json"}


def read_records(folder: Path) -> list[dict]:
    """Every json record of a shard folder, in shard and member order."""
    records = []
    for url in expand_urls(str(folder)):
        with tarfile.open(url) as tar:
            records += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return records


# ----------------------------------------------------------------------------- LLaVA JSON


def test_llava_writes_the_good_records_and_names_every_skip(llava_input, tmp_path):
    summary = run_llava(llava_input, tmp_path, samples_per_shard=3)
    assert summary["written"] == len(GOOD) and summary["images"] == 7
    assert summary["skipped"] == sum(len(ids) for ids in SKIPPED.values())
    reasons = {reason: [e["key"] for e in entry["examples"]] for reason, entry in summary["skip_reasons"].items()}
    assert reasons == SKIPPED
    assert summary["shards"] == 3 and json.loads((tmp_path / "summary.json").read_text()) == summary
    assert [r["id"] for r in read_records(tmp_path)] == GOOD  # input order, skips left out
    index = json.loads((tmp_path / "index.json").read_text())
    assert [s["num_samples"] for s in index["shards"]] == [3, 3, 1]


def test_shards_read_back_through_the_training_reader(llava_input, tokenizer_dir, tmp_path):
    run_llava(llava_input, tmp_path, samples_per_shard=3)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ensure_image_token(tokenizer)
    encoder = SampleEncoder(get_template("vicuna_v1", tokenizer), ImageProcessor(16, (0.5,) * 3, (0.5,) * 3), 4, 256)
    stream = ShardStream(expand_urls(str(tmp_path)), encoder, shuffle=False, loop=False, num_streams=1)
    examples = {example.key: example for example in stream}
    assert sorted(examples) == sorted(GOOD) and not stream.skipped
    assert len(examples["pair"].images) == 2 and examples["chat"].images == []
    assert tuple(examples["wide"].images[0].shape) == (3, 16, 16)


def test_rerun_and_any_worker_count_write_identical_shards(llava_input, tmp_path):
    run_llava(llava_input, tmp_path / "a", workers=1, samples_per_shard=2)
    first = shard_bytes(tmp_path / "a")
    run_llava(llava_input, tmp_path / "b", workers=2, samples_per_shard=2)
    run_llava(llava_input, tmp_path / "a", workers=2, samples_per_shard=2)  # again, into the same folder
    assert shard_bytes(tmp_path / "b") == first
    assert shard_bytes(tmp_path / "a") == first
    assert len(first) == 5  # 4 shards + index.json


def test_shard_byte_limit_holds_for_every_file(llava_input, tmp_path):
    limit = 10240  # the smallest tar file: a few of these samples each
    summary = run_llava(llava_input, tmp_path, max_shard_bytes=limit)
    sizes = [p.stat().st_size for p in tmp_path.glob("shard-*.tar")]
    assert len(sizes) == summary["shards"] > 1 and max(sizes) <= limit
    assert [r["id"] for r in read_records(tmp_path)] == GOOD


def test_sink_writes_the_same_bytes_as_write_shards(tmp_path):
    samples = [{"id": f"s{i}", "conversations": turns("<image>", f"a{i}"), "images": [jpeg()]} for i in range(5)]
    write_shards(samples, tmp_path / "writer", max_samples_per_shard=2)
    sink = ShardSink(tmp_path / "sink", "shard", max_samples=2, max_bytes=1 << 30)
    for i, sample in enumerate(samples):
        sink.add(sample_members(sample, key=f"{i:09d}"))
    sink.close()
    assert shard_bytes(tmp_path / "sink") == shard_bytes(tmp_path / "writer")


def test_fewer_shards_on_a_rerun_removes_the_stale_ones(llava_input, tmp_path):
    run_llava(llava_input, tmp_path, samples_per_shard=1)
    run_llava(llava_input, tmp_path, samples_per_shard=100)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar"]


def test_max_image_size_shrinks_large_images_only(llava_input, tmp_path):
    run_llava(llava_input, tmp_path, max_image_size=60)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    wide = Image.open(io.BytesIO(members["000000002.jpg"]))
    assert wide.size == (60, 20) and wide.format == "JPEG"  # 120x40, aspect kept
    diagram = Image.open(io.BytesIO(members["000000004.png"]))
    assert diagram.size == (60, 20) and diagram.format == "PNG"  # PNG stays lossless
    assert members["000000000.jpg"] == (llava_input / "images" / "red.jpg").read_bytes()  # small: untouched


def test_jsonl_input_with_broken_lines_is_converted_not_fatal(tmp_path):
    (tmp_path / "img.jpg").write_bytes(jpeg())
    lines = [
        json.dumps({"id": "a", "image": "img.jpg", "conversations": turns("<image>\nHi", "Red.")}),
        '{"id": "b", "conversations": [',
        json.dumps(["not", "a", "record"]),
        json.dumps({"id": "c", "conversations": [{"speaker": "x"}]}),
        json.dumps({"id": "d", "image": 7, "conversations": turns("<image>", "x")}),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    summary = convert_llava(tmp_path / "data.jsonl", ConvertOptions(tmp_path / "out", progress=False))
    assert summary["written"] == 1  # the image root defaults to the data file's folder
    reasons = {reason: entry["count"] for reason, entry in summary["skip_reasons"].items()}
    assert reasons == {"bad json": 1, "bad record": 2, "bad conversation": 1}
    assert "line 2" in summary["skip_reasons"]["bad json"]["examples"][0]["detail"]


def test_token_counts_use_the_template(llava_input, tokenizer_dir, tmp_path):
    summary = run_llava(llava_input, tmp_path, tokenizer=tokenizer_dir, template="chatml")
    tokens = summary["tokens"]
    assert tokens["template"] == "chatml" and tokens["max"] <= tokens["total"]
    assert tokens["total"] > 10 * len(GOOD)  # chatml adds a system turn and markers to every sample


def test_bad_options_are_named_before_any_work(llava_input, tmp_path):
    with pytest.raises(ValueError, match="--workers"):
        run_llava(llava_input, tmp_path, workers=0)
    with pytest.raises(FileNotFoundError, match="--image-root"):
        convert_llava(llava_input / "data.json", ConvertOptions(tmp_path, image_root=tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        run_llava(llava_input, tmp_path, tokenizer=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        convert_llava(tmp_path / "missing.json", ConvertOptions(tmp_path))


# ----------------------------------------------------------------------------- HF datasets


def test_hf_parquet_with_an_image_feature(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        }
    )
    rows = {
        "id": ["img", "text", "broken"],
        "image": [{"bytes": jpeg(), "path": None}, None, {"bytes": b"not an image", "path": None}],
        "conversations": [turns("<image>\nColour?", "Red."), turns("Hi.", "Hello."), turns("<image>\nHm?", "x")],
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    options = ConvertOptions(tmp_path / "out", workers=2, progress=False)
    summary = convert_hf(str(tmp_path / "*.parquet"), options, cache_dir=str(tmp_path / "cache"))
    assert summary["written"] == 2 and list(summary["skip_reasons"]) == ["undecodable image"]
    records = read_records(tmp_path / "out")
    assert [(r["id"], r["images"]) for r in records] == [("img", ["jpg"]), ("text", [])]
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert tar.extractfile("000000000.jpg").read() == jpeg()  # the stored bytes, not a re-encode


def test_hf_saved_dataset_with_question_answer_and_image_paths(tmp_path):
    import datasets

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(jpeg())
    rows = {"qid": [5, 6], "picture": ["a.jpg", "b.jpg"], "q": ["What colour?", "And this?"], "a": ["Red.", "?"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    columns = Columns(image="picture", question="q", answer="a", id="qid")
    options = ConvertOptions(tmp_path / "out", image_root=tmp_path / "images", progress=False)
    summary = convert_hf([str(tmp_path / "saved")], options, columns)
    assert summary["written"] == 1 and summary["skip_reasons"]["missing image"]["examples"][0]["key"] == "6"
    (record,) = read_records(tmp_path / "out")
    assert record["id"] == "5" and record["conversations"] == turns("<image>\nWhat colour?", "Red.")


def test_hf_without_text_columns_names_the_options(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="--conversations-column"):
        convert_hf(str(tmp_path / "saved"), ConvertOptions(tmp_path / "out", progress=False))
    datasets.Dataset.from_dict({"question": ["x"], "answer": ["y"]}).save_to_disk(str(tmp_path / "qa"))
    with pytest.raises(ValueError, match="--image-column 'img'"):
        convert_hf(str(tmp_path / "qa"), ConvertOptions(tmp_path / "out"), Columns(image="img"))
    with pytest.raises(ValueError, match="save_to_disk"):
        convert_hf(str(tmp_path), ConvertOptions(tmp_path / "out", progress=False))


# ----------------------------------------------------------------------------- pairs


def test_preference_pairs(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    pairs = [
        {"id": "p1", "image": "a.jpg", "prompt": "What colour?", "chosen": "Red.", "rejected": "Blue."},
        {"id": "p2", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
        {"id": "same", "prompt": "Q?", "chosen": "A.", "rejected": "A. "},
        {"id": "blank", "prompt": "Q?", "chosen": "", "rejected": "A."},
        {"id": "nochosen", "prompt": "Q?", "rejected": "A."},
        {"id": "gone", "image": "b.jpg", "prompt": "Q?", "chosen": "A.", "rejected": "B."},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(map(json.dumps, pairs)))
    summary = convert_pairs(tmp_path / "pairs.jsonl", ConvertOptions(tmp_path / "out", progress=False))
    reasons = {reason: entry["examples"][0]["key"] for reason, entry in summary["skip_reasons"].items()}
    assert reasons == {"identical pair": "same", "empty answer": "blank", "missing field": "nochosen",
                       "missing image": "gone"}  # fmt: skip
    first, second = read_records(tmp_path / "out")
    assert first == {"id": "p1", "prompt": "<image>\nWhat colour?", "chosen": "Red.", "rejected": "Blue.",
                     "meta": {"image": "a.jpg"}, "images": ["jpg"]}  # fmt: skip
    assert second["images"] == [] and second["prompt"] == "Say hi."


# ----------------------------------------------------------------------------- inspect


def test_inspect_reports_counts_sizes_lengths_mix_and_damage(llava_input, tokenizer_dir, tmp_path):
    run_llava(llava_input, tmp_path, samples_per_shard=3)
    with tarfile.open(tmp_path / "shard-000009.tar", "w") as tar:  # one sample with a broken record
        info = tarfile.TarInfo("zzz.json")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"{bad"))
    report = inspect(str(tmp_path))
    assert (report.shards, report.samples, report.images) == (4, len(GOOD), 7)
    assert report.modality == {"single-image": 5, "multi-image": 1, "text-only": 1}
    assert (min(report.widths), max(report.widths)) == (24, 120) and report.skipped == {"bad json": 1}
    assert report.length_unit == "words" and sorted(report.lengths)[0] == 3  # "What colour? Red."
    text = str(report)
    assert "text-only 1 (14.3%)" in text and "width  24 / 90 / 120" in text and "bad json: 1" in text
    with_tokens = inspect(str(tmp_path / "shard-00000{0..2}.tar"), tokenizer=tokenizer_dir)
    assert with_tokens.length_unit == "tokens" and min(with_tokens.lengths) > min(report.lengths)


# ----------------------------------------------------------------------------- CLI


def test_cli_convert_then_inspect(llava_input, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["data", "convert-llava", str(llava_input / "data.json"), "--image-root", str(llava_input / "images")]
    assert main([*args, "--out", str(out), "--workers", "1", "--max-shard-bytes", "1MB", "--no-progress"]) == 0
    assert f"wrote {len(GOOD)} samples" in capsys.readouterr().out and (out / "summary.json").is_file()
    assert main(["data", "inspect", str(out)]) == 0
    assert f"{len(GOOD)} samples in 1 shards" in capsys.readouterr().out


def test_cli_user_errors_name_the_problem(tmp_path, capsys):
    assert main(["data", "convert-pairs", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "nope.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x", "conversations": turns("q", "")}]))
    assert main(["data", "convert-llava", str(tmp_path / "bad.json"), "--out", str(tmp_path), "--no-progress"]) == 1
    assert "no sample was written" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "convert-llava", "x.json", "--out", str(tmp_path), "--max-shard-bytes", "lots"])
    assert "512MB" in capsys.readouterr().err
