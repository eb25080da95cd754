"""Shard streams: deterministic, world-size invariant, exactly resumable, robust to bad samples."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_tools.shard_writer import write_shards
from llava_train.data.health import TooMuchBadData
from llava_train.data.images import decode_image
from llava_train.data.shards import BadSample, ShardStream, build_loader, expand_urls, shard_sizes


def record(i: int, **extra) -> dict:
    conversations = [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]
    return {"id": f"s{i:03d}", "conversations": conversations, "meta": {"i": i}, **extra}


def sample_id(raw: dict) -> str:
    return raw["json"]["id"]


def ids(batch):  # collate_fn for id-only samples
    return list(batch)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> list[str]:
    """75 samples in 11 shards of 7 (the last holds 5): not a multiple of the 8 streams."""
    out = tmp_path_factory.mktemp("uneven")
    return write_shards((record(i) for i in range(75)), out, max_samples_per_shard=7)


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> list[str]:
    """64 samples in 16 shards of 4."""
    out = tmp_path_factory.mktemp("even")
    return write_shards((record(i) for i in range(64)), out, max_samples_per_shard=4)


def take(stream: ShardStream, n: int) -> list:
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


def test_same_seed_same_order_other_seed_other_order(uneven):
    first = take(ShardStream(uneven, sample_id, seed=3), 40)
    assert first == take(ShardStream(uneven, sample_id, seed=3), 40)
    assert first != take(ShardStream(uneven, sample_id, seed=4), 40)


def test_each_epoch_holds_every_sample_once_in_a_new_order(even):
    ranks = [iter(ShardStream(even, sample_id, rank=r, world_size=2)) for r in range(2)]
    epochs = [[next(it) for it in ranks for _ in range(32)] for _ in range(3)]
    everything = sorted(f"s{i:03d}" for i in range(64))
    assert all(sorted(epoch) == everything for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_one_pass_without_loop_reads_everything_once_in_file_order(uneven):
    per_rank = [list(ShardStream(uneven, sample_id, rank=r, world_size=2, loop=False)) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == [f"s{i:03d}" for i in range(75)]
    assert per_rank[0][:2] == ["s000", "s014"]  # stream 0 reads shard 0, stream 2 shard 2 (no shuffle)
    assert list(ShardStream(uneven, sample_id, loop=False)) == list(ShardStream(uneven, sample_id, loop=False))


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_global_step_has_the_same_samples_for_any_world_size(uneven, world_size):
    micro = 8 // world_size  # a multiple of num_streams / world_size
    steps = 25  # 200 samples: more than two epochs of uneven shards

    def step_sets(world, micro_batch):
        loaders = [
            iter(build_loader(ShardStream(uneven, sample_id, seed=7, rank=r, world_size=world), micro_batch, ids))
            for r in range(world)
        ]
        return [sorted(s for loader in loaders for s in next(loader)) for _ in range(steps)]

    assert step_sets(1, micro * world_size) == step_sets(world_size, micro)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_exactly_the_next_sample(uneven, num_workers):
    def loader():
        return build_loader(ShardStream(uneven, sample_id, seed=1), 4, ids, num_workers=num_workers)

    uninterrupted = loader()
    iterator = iter(uninterrupted)
    expected = [next(iterator) for _ in range(30)]  # > 1 epoch, crossing shard boundaries

    first = loader()
    iterator = iter(first)
    head = [next(iterator) for _ in range(13)]
    state = first.state_dict()
    del iterator, first

    resumed = loader()
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    tail = [next(iterator) for _ in range(17)]
    assert head + tail == expected


def test_resume_state_must_match_the_setup(uneven):
    state = ShardStream(uneven, sample_id, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        ShardStream(uneven, sample_id).load_state_dict(state)
    with pytest.raises(ValueError, match="num_shards"):
        ShardStream(uneven[:-1], sample_id, rank=0, world_size=2).load_state_dict(state)


def test_a_state_from_another_worker_count_is_refused(uneven):
    saved = build_loader(ShardStream(uneven, sample_id), 4, ids, num_workers=0)
    next(iter(saved))
    with pytest.raises(ValueError, match="data.num_workers=0, but this run has data.num_workers=2"):
        build_loader(ShardStream(uneven, sample_id), 4, ids, num_workers=2).load_state_dict(saved.state_dict())


def test_stream_and_worker_counts_are_checked(uneven):
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        ShardStream(uneven, sample_id, world_size=3)
    with pytest.raises(ValueError, match="data.num_workers"):
        build_loader(ShardStream(uneven, sample_id, rank=0, world_size=2), 2, ids, num_workers=3)


# ----------------------------------------------------------------------------- bad data


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def decode_all(raw: dict) -> str:
    record = raw["json"]
    if "conversations" not in record:
        raise BadSample("missing field", "conversations")
    for ext in record.get("images", []):
        if ext not in raw:
            raise BadSample("missing image", ext)
        decode_image(raw[ext])
    return record["id"]


def test_bad_samples_are_skipped_and_counted(tmp_path):
    good = json.dumps(record(0, images=["png"])).encode()
    with tarfile.open(tmp_path / "bad-000000.tar", "w") as tar:
        add(tar, "a.json", good)
        add(tar, "a.png", png_bytes())
        add(tar, "b.json", b"{not json")
        add(tar, "c.json", json.dumps(record(2, images=["png"])).encode())  # its image is missing
        add(tar, "d.json", json.dumps(record(3, images=["png"])).encode())
        add(tar, "d.png", b"garbage, not a png")
        add(tar, "e.json", json.dumps({"id": "e"}).encode())  # no conversations
        add(tar, "f.png", png_bytes())  # no record at all
        add(tar, "g.json", json.dumps(record(6)).encode())
    (tmp_path / "bad-000001.tar").write_bytes(b"this is not a tar file")
    whole = (tmp_path / "bad-000000.tar").read_bytes()
    (tmp_path / "bad-000002.tar").write_bytes(whole[:1536])  # cut inside a member's data

    stream = ShardStream(expand_urls([str(tmp_path / "bad-*.tar")]), decode_all, shuffle=False, loop=False)
    assert sorted(stream) == ["s000", "s006"]
    assert stream.skipped == Counter(
        {
            "bad json": 1,
            "missing image": 1,
            "undecodable image": 1,
            "missing field": 1,
            "missing json": 1,
            "corrupt shard": 2,  # the non-tar file and the truncated tar
            "corrupt member": 1,  # the member cut short
        }
    )
    assert stream.state_dict()["skipped"] == dict(stream.skipped)


def test_a_stream_with_no_usable_sample_fails_loudly(tmp_path):
    urls = write_shards([record(i) for i in range(4)], tmp_path, max_samples_per_shard=2)

    def reject(raw):
        raise BadSample("over-long", "always")

    with pytest.raises(RuntimeError, match="without a usable sample"):
        take(ShardStream(urls, reject), 1)


def every_third_undecodable(raw: dict) -> str:
    if int(raw["json"]["id"][1:]) % 3 == 0:
        raise BadSample("undecodable image", "cannot identify image file")
    return raw["json"]["id"]


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> list[str]:
    """480 samples: with 2 workers each reads 240, past the 200 the bad fraction waits for."""
    return write_shards((record(i) for i in range(480)), tmp_path_factory.mktemp("480"), max_samples_per_shard=30)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_too_much_bad_data_stops_with_the_counts_and_example_keys(many, num_workers):
    stream = ShardStream(many, every_third_undecodable, shuffle=False, loop=False, max_bad_fraction=0.2)
    with pytest.raises(TooMuchBadData) as caught:
        list(build_loader(stream, 4, ids, num_workers=num_workers))
    message = str(caught.value)
    assert "data.max_bad_fraction=0.2" in message and "{'undecodable image': " in message
    assert "shard-000000.tar/000000000 (undecodable image)" in message  # keys to look at
    # a third is bad: within a limit of 0.4 the whole pass goes through
    tolerant = ShardStream(many, every_third_undecodable, shuffle=False, loop=False, max_bad_fraction=0.4)
    assert len(list(tolerant)) == 320 and tolerant.skipped == Counter({"undecodable image": 160})


def test_the_bad_fraction_is_judged_only_after_enough_samples(many):
    def first_hundred_bad(raw):
        if int(raw["json"]["id"][1:]) < 100:
            raise BadSample("missing image", "x")
        return raw["json"]["id"]

    early = ShardStream(many, first_hundred_bad, shuffle=False, loop=False, num_streams=1, max_bad_fraction=0.6)
    assert len(list(early)) == 380  # 100 bad of the first 150 is 67%, but by sample 200 it is 50%...
    strict = ShardStream(many, first_hundred_bad, shuffle=False, loop=False, num_streams=1, max_bad_fraction=0.45)
    with pytest.raises(TooMuchBadData, match="100 of the 200 samples"):
        list(strict)  # ...which a limit of 0.45 refuses at sample 200


def test_each_skip_is_logged_with_its_key_but_rate_limited(many, caplog):
    stream = ShardStream(many, every_third_undecodable, shuffle=False, loop=False, num_streams=1)
    with caplog.at_level(logging.WARNING, logger="llava_train.data"):
        assert len(list(stream)) == 320
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0].startswith("skipping sample shard-000000.tar/000000000: undecodable image")
    assert 10 <= len(warnings) < 100  # a burst, then at most one per interval, not one per bad sample


# ----------------------------------------------------------------------------- paths and writer


def test_expand_urls_handles_braces_globs_folders_and_missing_files(uneven):
    folder = Path(uneven[0]).parent
    braces = expand_urls([str(folder / "shard-{000000..000010}.tar")])
    assert braces == uneven
    assert expand_urls([str(folder / "shard-*.tar")]) == uneven
    assert expand_urls(str(folder)) == uneven
    assert expand_urls([uneven[1], uneven[0], uneven[1]]) == [uneven[1], uneven[0]]
    with pytest.raises(FileNotFoundError, match=r"shard-000011\.tar.*from pattern"):
        expand_urls([str(folder / "shard-{000000..000011}.tar")])
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_urls([str(folder / "nothing-*.tar")])
    with pytest.raises(ValueError, match="uncompressed"):
        ShardStream(["data-000000.tar.gz"], sample_id)


def test_writer_is_deterministic_and_indexes_its_shards(tmp_path, uneven):
    images = [Image.new("RGB", (6, 4), (0, 0, 255)), png_bytes()]
    samples = [record(i, images=images) for i in range(5)]
    first = write_shards(samples, tmp_path / "a", max_samples_per_shard=2)
    again = write_shards(samples, tmp_path / "b", max_samples_per_shard=2)
    assert [Path(p).read_bytes() for p in first] == [Path(p).read_bytes() for p in again]
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index == {"shards": [{"name": f"shard-00000{i}.tar", "num_samples": n} for i, n in enumerate([2, 2, 1])]}
    raw = next(iter(ShardStream(first, lambda r: r, shuffle=False, loop=False)))
    assert raw["json"]["images"] == ["0.png", "1.png"] and raw["json"]["meta"] == {"i": 0}
    assert decode_image(raw["0.png"]).size == (6, 4) and raw["1.png"] == png_bytes()
    assert shard_sizes(uneven) == [7] * 10 + [5]
    (Path(first[0]).parent / "index.json").unlink()
    assert shard_sizes(first) == [2, 2, 1]  # counted from the tars
    rewritten = write_shards(samples[:2], tmp_path / "a", max_samples_per_shard=2)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == [Path(p).name for p in rewritten]
