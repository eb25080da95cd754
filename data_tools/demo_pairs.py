"""Preference pairs on the demo's coloured shapes (data_tools/demo_data.py's scenes): for DPO recipes and benches.

Each pair asks one question about a fresh image (colour, count, shape or position, or the `qtypes` chosen);
`chosen` is the right answer, `rejected` a hallucinated one (another colour, count, shape or region), the object
hallucination DPO is meant to cut. Scenes are drawn as demo_data draws its training images (the same share of
single shapes, which alone answer position) from their own seeded stream, disjoint from demo_data's pretrain / sft /
eval images.

  out_dir/shard-*.tar   pair records {id, prompt, chosen, rejected, images, meta {qtype}} (as `data convert-pairs`)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from data_tools.convert_records import record_members
from data_tools.demo_data import (
    COLOURS, COUNT_WORDS, QUESTIONS, REGIONS, SHAPES, TRAIN_FORCED_SINGLE, answers, draw_scene, random_scene,
)  # fmt: skip
from data_tools.shard_writer import ShardSink

# Every answer each question type can have: a rejected answer is one of the others.
ANSWERS = {"colour": tuple(COLOURS), "count": tuple(COUNT_WORDS.values()), "shape": SHAPES, "position": tuple(REGIONS)}


def pair_record(scene: dict, rng: np.random.Generator, index: int, prefix: str, qtypes: tuple[str, ...]) -> dict:
    truth = answers(scene)
    asked = [q for q in qtypes if q in truth]  # position only of single shapes
    qtype = asked[rng.integers(len(asked))]
    wrong = [a for a in ANSWERS[qtype] if a != truth[qtype]]
    question = QUESTIONS[qtype][rng.integers(len(QUESTIONS[qtype]))]
    return {"id": f"{prefix}-{index:06d}", "prompt": f"<image>\n{question}", "chosen": truth[qtype],
            "rejected": wrong[rng.integers(len(wrong))], "meta": {"qtype": qtype}}  # fmt: skip


def build_demo_pairs(
    out_dir: str | Path, *, num_pairs: int, image_size: int, shape_scale: float = 1.0, seed: int = 0,
    samples_per_shard: int = 100, prefix: str = "pair", qtypes: tuple[str, ...] = tuple(ANSWERS),
) -> list[str]:
    """Write `num_pairs` pairs as shards into out_dir; returns the shard paths (deterministic for the arguments).

    `image_size` and `shape_scale` must be those of the demo data the model trained on."""
    unknown = set(qtypes) - set(ANSWERS)
    if unknown or not qtypes:
        raise ValueError(f"qtypes {sorted(unknown) or '(none)'}: choose from {sorted(ANSWERS)}")
    rng = np.random.default_rng([seed, 7, sum(map(ord, prefix))])  # apart from demo_data's streams
    sink = ShardSink(Path(out_dir), "shard", samples_per_shard, 1 << 30)
    for index in range(num_pairs):
        # Only position asked: single shapes only; otherwise as the training images.
        single = qtypes == ("position",) or bool(rng.random() < TRAIN_FORCED_SINGLE)
        scene = random_scene(rng, single=single)
        image = draw_scene(scene, rng, image_size, shape_scale)
        record = pair_record(scene, rng, index, prefix, tuple(qtypes))
        png = io.BytesIO()
        image.save(png, format="PNG")
        sink.add(record_members(f"{index:09d}", record, [("png", png.getvalue())]))
    return [str(Path(out_dir) / shard["name"]) for shard in sink.close()]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="e.g. runs/demo/data/pairs (where recipes/dpo/demo_dpo.yaml reads them)")
    parser.add_argument("--num-pairs", type=int, default=2000)
    from llava_train.demo import SHAPE_SCALE

    parser.add_argument("--image-size", type=int, default=48, help="the demo tower's (recipes/demo/base.yaml)")
    parser.add_argument("--shape-scale", type=float, default=SHAPE_SCALE, help="the demo's (llava_train/demo.py)")
    parser.add_argument("--qtypes", nargs="+", default=list(ANSWERS), choices=list(ANSWERS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shards = build_demo_pairs(args.out_dir, num_pairs=args.num_pairs, image_size=args.image_size,
                              shape_scale=args.shape_scale, seed=args.seed, qtypes=tuple(args.qtypes))  # fmt: skip
    print(f"wrote {args.num_pairs} pairs in {len(shards)} shards to {args.out_dir}")
