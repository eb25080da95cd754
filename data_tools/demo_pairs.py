"""Preference pairs on the demo's coloured shapes (data_tools/demo_data.py's scenes): for DPO recipes and benches.

Each pair asks one colour or count question about a fresh image; `chosen` is the right answer, `rejected` a
hallucinated one (another colour, another count), the object hallucination DPO is meant to cut. The scenes come
from their own seeded stream, disjoint from demo_data's pretrain / sft / eval images.

  out_dir/shard-*.tar   pair records {id, prompt, chosen, rejected, images, meta {qtype}} (as `data convert-pairs`)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from data_tools.convert_records import record_members
from data_tools.demo_data import COLOURS, COUNT_WORDS, QUESTIONS, answers, draw_scene, random_scene
from data_tools.shard_writer import ShardSink

QTYPES = ("colour", "count")


def pair_record(scene: dict, rng: np.random.Generator, index: int, prefix: str) -> dict:
    qtype = QTYPES[rng.integers(len(QTYPES))]
    truth = answers(scene)[qtype]
    wrong = [c for c in COLOURS if c != truth] if qtype == "colour" else [w for w in COUNT_WORDS.values() if w != truth]
    question = QUESTIONS[qtype][rng.integers(len(QUESTIONS[qtype]))]
    return {"id": f"{prefix}-{index:06d}", "prompt": f"<image>\n{question}", "chosen": truth,
            "rejected": wrong[rng.integers(len(wrong))], "meta": {"qtype": qtype}}  # fmt: skip


def build_demo_pairs(
    out_dir: str | Path, *, num_pairs: int, image_size: int, seed: int = 0, samples_per_shard: int = 100,
    prefix: str = "pair",
) -> list[str]:
    """Write `num_pairs` pairs as shards into out_dir; returns the shard paths (deterministic for the arguments)."""
    rng = np.random.default_rng([seed, 7, sum(map(ord, prefix))])  # apart from demo_data's streams
    sink = ShardSink(Path(out_dir), "shard", samples_per_shard, 1 << 30)
    for index in range(num_pairs):
        scene = random_scene(rng)
        image = draw_scene(scene, rng, image_size)
        record = pair_record(scene, rng, index, prefix)
        png = io.BytesIO()
        image.save(png, format="PNG")
        sink.add(record_members(f"{index:09d}", record, [("png", png.getvalue())]))
    return [str(Path(out_dir) / shard["name"]) for shard in sink.close()]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="e.g. runs/demo/data/pairs (where recipes/dpo/demo_dpo.yaml reads them)")
    parser.add_argument("--num-pairs", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shards = build_demo_pairs(args.out_dir, num_pairs=args.num_pairs, image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.num_pairs} pairs in {len(shards)} shards to {args.out_dir}")
