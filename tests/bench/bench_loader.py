"""Loader throughput: llava_train's shard loader vs a plain LLaVA-style loader, same data, one run.

Both sides read data_tools/synthetic.py's LLaVA-Instruct-like set (336-px JPEGs, ~6%
text-only; identical JPEG bytes) and do the same work per sample: decode the image,
pad-to-square + resize to 336 + normalise (llava_train's ImageProcessor), encode the
conversation with the same vicuna_v1 template and tokenizer (576 image tokens), collate.
- llava_train: webdataset shards -> ShardStream -> BatchStream -> collate (StatefulDataLoader).
- plain: LLaVA's LazySupervisedDataset shape: the JSON list in memory, `PIL.Image.open` of
  the image file in `__getitem__`, a shuffling torch DataLoader.
Both run in the main process (num_workers=0), so samples/s is per loader worker. Rounds
alternate the two sides; the table shows the median and every round. Nothing is asserted.

    python tests/bench/bench_loader.py --samples 1000 --rounds 3 --batch 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from llava_train.data.batch import Example  # noqa: E402
from llava_train.data.batch_stream import BatchStream  # noqa: E402
from llava_train.data.batching import BatchingConfig  # noqa: E402
from llava_train.data.collate import collate, collate_rows  # noqa: E402
from llava_train.data.encode import SampleEncoder  # noqa: E402
from llava_train.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor  # noqa: E402
from llava_train.data.shards import ShardStream, build_loader, expand_urls  # noqa: E402
from llava_train.data.templates import get_template  # noqa: E402

IMAGE_SIZE, IMAGE_TOKENS, MAX_LENGTH = 336, 576, 4096


class PlainLlavaDataset(Dataset):
    """What LLaVA's LazySupervisedDataset does per item, with the same template and preprocessing."""

    def __init__(self, json_path: Path, image_root: Path, template, processor):
        self.records = json.loads(json_path.read_text())
        self.image_root, self.template, self.processor = image_root, template, processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        record = self.records[index]
        images = []
        if "image" in record:
            images.append(self.processor(Image.open(self.image_root / record["image"]).convert("RGB")))
        encoded = self.template.encode(record["conversations"], IMAGE_TOKENS, MAX_LENGTH)
        return Example(encoded.input_ids, encoded.labels, images=images, key=record["id"])


def time_pass(loader, batches: int) -> float:
    """Seconds to pull `batches` batches (the first one included: both sides start cold)."""
    start = time.perf_counter()
    iterator = iter(loader)
    for _ in range(batches):
        next(iterator)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from data_tools.synthetic import build_instruct_like, vocabulary_texts
    from data_tools.tokenizer import train_tokenizer

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_loader_"))
    # One shard per logical stream: every shard is then read (and its tar headers indexed) once per
    # epoch, as in a real run, instead of 8 streams each indexing a big shard to read a few samples.
    per_shard = -(-args.samples // 8)
    data = build_instruct_like(workdir / "input", args.samples, image_size=IMAGE_SIZE, samples_per_shard=per_shard)
    tokenizer = train_tokenizer(vocabulary_texts(), workdir / "tokenizer")
    template = get_template("vicuna_v1", tokenizer)
    processor = ImageProcessor(IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="pad")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    batches = args.samples // args.batch

    def ours():
        encoder = SampleEncoder(template, processor, IMAGE_TOKENS, MAX_LENGTH)
        stream = ShardStream(expand_urls([str(data["shards"])]), encoder, seed=0)
        collate_fn = partial(collate_rows, pad_token_id=tokenizer.pad_token_id, image_token_id=image_id)
        return build_loader(BatchStream(stream, BatchingConfig(args.batch)), None, collate_fn)

    def plain():
        dataset = PlainLlavaDataset(data["json"], data["images"], template, processor)
        collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id, image_token_id=image_id)
        return DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=collate_fn)

    sides = {"llava_train shards": ours, "plain LLaVA json + PIL": plain}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, make in sides.items():
            rates[name].append(batches * args.batch / time_pass(make(), batches))

    jpeg_kb = statistics.mean(p.stat().st_size for p in data["images"].iterdir()) / 1024
    print(f"\n{args.samples} samples ({jpeg_kb:.0f} KB JPEGs, {IMAGE_SIZE} px), batch {args.batch}, "
          f"one worker (main process), median of {args.rounds} alternating rounds")
    print("| loader | samples/s | ms/sample | rounds (samples/s) |")
    print("|---|---:|---:|---|")
    base = statistics.median(rates["plain LLaVA json + PIL"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} ({median / base:.2f}x) | {1000 / median:.2f} | "
              f"{', '.join(f'{v:.1f}' for v in values)} |")


if __name__ == "__main__":
    main()
