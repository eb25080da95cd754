"""Resume time after 90% of an epoch of 100k samples, against reading up to that point.

100k small samples (8x8 PNG + a one-turn conversation) in 100 shards of 1000. The loader is
the training one (ShardStream -> BatchStream -> collate; vicuna_v1 template, 32-px images,
32 samples per micro-batch). It reads 90% of the epoch once (timed: what a loader without
a seekable state pays to get back there, decoding everything), saves its state, then a
fresh loader loads the state and yields its first batch (timed, several times). Also timed:
reading the same 90k samples as raw tar members without decoding or tokenising (the floor
for any skip-by-reading resume), and a resume with packing, which re-reads one planning
window. Prints one table; nothing is asserted.

    python tests/bench/bench_resume.py --samples 100000 --fraction 0.9 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from data_tools.shard_writer import write_shards  # noqa: E402
from llava_train.data.batch_stream import BatchStream  # noqa: E402
from llava_train.data.batching import BatchingConfig  # noqa: E402
from llava_train.data.collate import collate_rows  # noqa: E402
from llava_train.data.encode import SampleEncoder  # noqa: E402
from llava_train.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor  # noqa: E402
from llava_train.data.shards import ShardStream, build_loader, expand_urls  # noqa: E402
from llava_train.data.templates import get_template  # noqa: E402

BATCH = 32


def small_samples(count: int):
    pngs = []
    for shade in range(16):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (shade * 16, 100, 255 - shade * 16)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    for i in range(count):
        conversations = [
            {"from": "human", "value": f"<image>\nWhat colour is tile {i}?"},
            {"from": "gpt", "value": f"Shade {i % 16} of blue."},
        ]
        yield {"id": f"r{i:06d}", "conversations": conversations, "images": [pngs[i % 16]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--fraction", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from data_tools.synthetic import vocabulary_texts
    from data_tools.tokenizer import train_tokenizer

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_resume_"))
    shards = workdir / "shards"
    if not (shards / "index.json").is_file():
        start = time.perf_counter()
        write_shards(small_samples(args.samples), shards, max_samples_per_shard=1000)
        print(f"wrote {args.samples} samples in {time.perf_counter() - start:.0f} s")
    urls = expand_urls([str(shards)])
    tokenizer = train_tokenizer(vocabulary_texts() + ["What colour is tile Shade of blue"], workdir / "tokenizer")
    encoder = SampleEncoder(
        get_template("vicuna_v1", tokenizer), ImageProcessor(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), 16, 256
    )
    collate_fn = partial(
        collate_rows, pad_token_id=tokenizer.pad_token_id, image_token_id=tokenizer.convert_tokens_to_ids("<image>")
    )

    def loader(cfg: BatchingConfig):
        return build_loader(BatchStream(ShardStream(urls, encoder, seed=0), cfg), None, collate_fn)

    plain = BatchingConfig(BATCH)
    packed = BatchingConfig(BATCH // 4, packing=True, max_tokens_per_row=256, window=256)
    batches = int(args.samples * args.fraction) // BATCH
    rows = []

    def read_to(first, count: int) -> tuple[float, dict]:
        start = time.perf_counter()
        iterator = iter(first)
        for _ in range(count):
            next(iterator)
        return time.perf_counter() - start, first.state_dict()

    def resume(cfg: BatchingConfig, state: dict) -> float:
        start = time.perf_counter()
        again = loader(cfg)
        again.load_state_dict(state)
        next(iter(again))
        return time.perf_counter() - start

    seconds, state = read_to(loader(plain), batches)
    rows.append(("read 90% of the epoch (decode + tokenise + collate)", seconds))
    raw = build_loader(ShardStream(urls, lambda sample: sample, seed=0), BATCH, list)
    rows.append(("read 90% as raw tar members (no decoding)", read_to(raw, batches)[0]))
    times = [resume(plain, state) for _ in range(args.repeats)]
    rows.append(("resume: load_state_dict + first batch", statistics.median(times)))
    _, packed_state = read_to(loader(packed), 40)  # stops inside a planning window
    times = [resume(packed, packed_state) for _ in range(args.repeats)]
    rows.append(("resume with packing (re-reads one 256-sample window)", statistics.median(times)))

    print(f"\n{args.samples} samples in {len(urls)} shards, resumed after {batches * BATCH} "
          f"({args.fraction:.0%}); resume times are the median of {args.repeats}")
    print("| what | seconds |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
