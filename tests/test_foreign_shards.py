"""Shards from other webdataset tools: webdataset.ShardWriter output and img2dataset's layout are read,
inspected, resumed exactly and trained on; webdataset.WebDataset reads the project's shards."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_tools.inspect_shards import inspect
from data_tools.shard_writer import write_shards
from llava_train.data.raw_sample import sample_parts
from llava_train.data.shards import ShardStream, build_loader, expand_urls
from llava_train.recipe import validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20)]


def image(i: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20 + i % 5, 12 + i % 3), COLOURS[i % 4]).save(buffer, format=fmt)
    return buffer.getvalue()


def turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def shardwriter_sample(i: int) -> dict:
    """A user pipeline's samples: no `images` list; one image, numbered images, or text only."""
    key = f"w{i:04d}"
    if i % 4 == 0:
        return {"__key__": key, "jpg": image(i), "json": {"conversations": turns("<image>\nWhat colour?", f"c{i}")}}
    if i % 4 == 1:  # one image and no placeholder: LLaVA's layout puts it in front of the first question
        return {"__key__": key, "png": image(i, "PNG"), "json": {"conversations": turns("Describe it.", f"d{i}")}}
    if i % 4 == 2:
        record = {"conversations": turns("<image> then <image>: the same?", f"n{i}")}
        return {"__key__": key, "0.jpg": image(i), "1.webp": image(i + 1, "WEBP"), "json": record}
    return {"__key__": key, "json": {"conversations": turns("Say hi.", f"h{i}")}}


def img2dataset_sample(shard: int, i: int) -> dict:
    """img2dataset's members: KEY.jpg, KEY.txt (caption), KEY.json (download metadata, no conversation)."""
    key = f"{shard:05d}{i:04d}"
    caption = f"a {['red', 'green', 'blue', 'yellow'][i % 4]} picture number {i}"
    meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "error_message": None,
            "width": 20, "height": 12, "original_width": 640, "original_height": 384, "caption": caption}
    return {"__key__": key, "jpg": image(i), "txt": caption, "json": meta}


@pytest.fixture(scope="module")
def shardwriter(tmp_path_factory) -> list[str]:
    """24 samples in 5 shards of at most 5, written by webdataset.ShardWriter."""
    out = tmp_path_factory.mktemp("shardwriter")
    with wds.ShardWriter(str(out / "wds-%06d.tar"), maxcount=5, verbose=0) as sink:
        for i in range(24):
            sink.write(shardwriter_sample(i))
    return expand_urls(str(out))


@pytest.fixture(scope="module")
def img2dataset(tmp_path_factory) -> list[str]:
    """24 caption samples in 3 shards, laid out as img2dataset writes them (it uses webdataset's TarWriter)."""
    out = tmp_path_factory.mktemp("img2dataset")
    for shard in range(3):
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as sink:
            for i in range(8):
                sink.write(img2dataset_sample(shard, i))
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 8, "successes": 8}))
    return expand_urls(str(out))


LAYOUTS = ["shardwriter", "img2dataset"]


def key_and_images(raw: dict) -> tuple[str, list[bytes]]:
    return raw["__key__"], sample_parts(raw).images


# ----------------------------------------------------------------------------- reading


def test_shardwriter_samples_bring_their_image_members_in_order(shardwriter):
    stream = ShardStream(shardwriter, key_and_images, shuffle=False, loop=False)
    read = dict(stream)
    expected = {}
    for i in range(24):
        sample = shardwriter_sample(i)
        expected[sample["__key__"]] = [sample[ext] for ext in ("jpg", "png", "0.jpg", "1.webp") if ext in sample]
    assert read == expected and not stream.skipped
    assert sum(len(images) for images in read.values()) == 6 + 6 + 12


def test_img2dataset_captions_become_pretrain_samples(img2dataset):
    stream = ShardStream(img2dataset, lambda raw: (raw["__key__"], sample_parts(raw)), shuffle=False, loop=False)
    read = dict(stream)
    assert len(read) == 24 and not stream.skipped
    parts = read["000010003"]
    assert parts.kind == "caption" and parts.images == [image(3)]
    assert parts.conversations == turns("<image>", "a yellow picture number 3")


def webdataset_samples(urls: list[str]) -> dict[str, dict]:
    """What webdataset.WebDataset groups from the tars: key -> {ext: bytes}."""
    dataset = wds.WebDataset(urls, shardshuffle=False)
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in dataset}


def project_samples(urls: list[str]) -> dict[str, dict]:
    def members(raw):
        return raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__") and k != "json"}

    return dict(ShardStream(urls, members, shuffle=False, loop=False))


@pytest.mark.parametrize("layout", ["project", *LAYOUTS])
def test_webdataset_and_the_project_group_the_same_samples(layout, request, tmp_path):
    if layout == "project":
        images = [[image(j) for j in range(i % 3)] for i in range(9)]  # none, one or two
        records = [
            {"id": f"p{i}", "conversations": turns("<image>" * len(pics), "a"), "images": pics}
            for i, pics in enumerate(images)
        ]
        urls = write_shards(records, tmp_path, max_samples_per_shard=4)
    else:
        urls = request.getfixturevalue(layout)
    theirs, ours = webdataset_samples(urls), project_samples(urls)
    assert sorted(theirs) == sorted(ours) and len(ours) in (9, 24)
    for key, members in theirs.items():
        record = json.loads(members.pop("json"))
        assert members == ours[key], key
        if layout == "project":  # the record's `images` name the members webdataset found
            assert sorted(record["images"]) == sorted(ext for ext in members)


def test_member_extensions_are_lower_cased_as_webdataset_does(tmp_path):
    with tarfile.open(tmp_path / "upper-000000.tar", "w") as tar:
        members = [("a.JPG", image(0)), ("a.TXT", b"a caption"), ("dir/b.json", b'{"x": 1}'), ("dir/b.Txt", b"c")]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    urls = [str(tmp_path / "upper-000000.tar")]
    assert project_samples(urls) == {"a": {"jpg": image(0), "txt": b"a caption"}, "dir/b": {"txt": b"c"}}
    theirs = {"a": {"jpg": image(0), "txt": b"a caption"}, "dir/b": {"json": b'{"x": 1}', "txt": b"c"}}
    assert webdataset_samples(urls) == theirs


# ----------------------------------------------------------------------------- resume


def ids(batch):
    return list(batch)


def key_and_count(raw: dict) -> tuple[str, int]:
    return raw["__key__"], len(sample_parts(raw).images)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_continues_with_exactly_the_next_sample(request, layout, num_workers):
    urls = request.getfixturevalue(layout)  # 24 samples: 5 shards of <= 5, or 3 shards of 8 (fewer than 8 streams)

    def loader():
        return build_loader(ShardStream(urls, key_and_count, seed=1), 4, ids, num_workers=num_workers)

    iterator = iter(loader())
    expected = [next(iterator) for _ in range(15)]  # 60 samples: past two epochs, crossing shard boundaries

    first = loader()
    iterator = iter(first)
    head = [next(iterator) for _ in range(7)]
    state = first.state_dict()
    del iterator, first

    resumed = loader()
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    tail = [next(iterator) for _ in range(8)]
    assert head + tail == expected
    counts = dict(ShardStream(urls, key_and_count, shuffle=False, loop=False))  # one plain pass
    assert all(counts[key] == n for batch in expected for key, n in batch) and sum(counts.values()) >= 24


# ----------------------------------------------------------------------------- inspect


def test_inspect_counts_their_images_and_names_unused_members_and_skips(tmp_path):
    stray = {"__key__": "stray", "png": image(1, "PNG"), "jpg": image(2),  # the record lists png only
             "json": {"conversations": turns("<image> q", "a"), "images": ["png"]}}
    no_list = {"conversations": turns("q", "a")}
    ambiguous = {"__key__": "ambiguous", "jpg": image(3), "png": image(4, "PNG"), "json": no_list}
    mismatch = {"__key__": "mismatch", "0.jpg": image(5), "1.jpg": image(6), "json": no_list}
    orphan = {"__key__": "orphan", "jpg": image(7)}
    samples = [shardwriter_sample(i) for i in range(4)] + [img2dataset_sample(0, 0), stray, ambiguous, mismatch, orphan]
    with wds.ShardWriter(str(tmp_path / "mixed-%06d.tar"), maxcount=100, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)

    report = inspect(str(tmp_path))
    assert report.samples == 6 and report.images == 1 + 1 + 2 + 1 + 1  # not "0 images"
    assert report.kinds == {"conversation": 5, "caption": 1}
    assert report.modality == {"single-image": 4, "multi-image": 1, "text-only": 1}
    assert report.unused_images == ["mixed-000000.tar/stray.jpg"]
    assert report.skipped == {"ambiguous images": 1, "image count mismatch": 1, "missing json": 1}
    assert report.skip_examples["image count mismatch"] == [
        "mixed-000000.tar/mismatch: image count mismatch: 0 <image> in the text, 2 images"
    ]
    text = str(report)
    assert "image members no record uses: 1\n  mixed-000000.tar/stray.jpg" in text
    assert "  ambiguous images: 1\n    mixed-000000.tar/ambiguous: ambiguous images: image members ['jpg', 'png']" in (
        text
    )
    assert "  missing json: 1\n    mixed-000000.tar/orphan: missing json: no .json record or .txt caption" in text


# ----------------------------------------------------------------------------- training


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train(demo_data, urls, output_dir, layout, **train_options):
    recipe = tiny_recipe_dict(demo_data, output_dir, max_steps=4, log_every=1, **train_options)
    recipe["data"].update(train=[str(Path(urls[0]).parent)], eval=[])
    if layout == "img2dataset":  # captions: LLaVA stage 1
        recipe["stage"]["name"], recipe["data"]["template"] = "pretrain", "plain"
    return Trainer(validate_recipe(recipe)).train()


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_on_their_shards_resumes_exactly(demo_data, request, layout, tmp_path):
    urls = request.getfixturevalue(layout)
    train(demo_data, urls, tmp_path / "full", layout, save_every=2)
    rows = metrics(tmp_path / "full")
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
    assert not [key for row in rows for key in row if key.startswith("data/skipped")]  # every sample was used

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    train(demo_data, urls, resumed, layout, resume="auto")
    expected = {row["step"]: row["loss"] for row in rows if "loss" in row}
    got = {row["step"]: row["loss"] for row in metrics(resumed) if "loss" in row}
    assert sorted(got) == [3, 4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
