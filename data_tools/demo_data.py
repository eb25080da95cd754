"""The built-in demo data: coloured shapes on a plain background, with questions about them.

Each image holds 1-3 shapes of one kind and one colour (one per quadrant when several); half of the training
images hold one shape, held-out counts are uniform.
Questions ask the colour, the shape, the count and (single-shape images only) the position.
Answers are single words so held-out accuracy is an exact match. Everything is drawn with PIL from a seeded
generator, so a build is deterministic and takes seconds.

  out_dir/pretrain/  caption records (LLaVA stage 1, `plain` template)
  out_dir/sft/       every question an image answers (3-4 turns; `questions` caps them), stage 2
  out_dir/eval/      one question per record, the types in turn, meta {"qtype", "answer"}
  out_dir/tokenizer/ byte-level BPE trained on all of the text above
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_tools.shard_writer import write_shards
from data_tools.tokenizer import train_tokenizer

STAMP = "demo_data.json"
VERSION = 3
EVAL_SHARDS = 8  # at least one eval shard per data stream, so every rank gets an equal share

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
BACKGROUND = (245, 245, 240)
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# Share of training images forced to one shape, on top of the 1/3 that uniform counts give: half of them then hold
# one shape. Position is asked of single shapes only and is the type learnt last (README: The demo).
TRAIN_FORCED_SINGLE = 0.25
# Region centres as fractions of the image size, for single-shape images.
REGIONS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78), "centre": (0.5, 0.5)}

QUESTIONS = {
    "colour": ["What colour is the shape?", "What color are the shapes?", "Which colour is used in the image?"],
    "shape": ["What shape is shown?", "Which shape do you see?", "What kind of shape is in the image?"],
    "count": ["How many shapes are there?", "How many objects can you see?", "Count the shapes."],
    "position": ["Where is the shape?", "In which part of the image is the shape?", "Where is the object located?"],
}
CAPTION_PROMPTS = ["Describe the image.", "What is in the picture?", "Give a short description of the image."]


# ----------------------------------------------------------------------------- scenes


def random_scene(rng: np.random.Generator, single: bool = False) -> dict:
    count = 1 if single else int(rng.integers(1, 4))
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "count": count,
        "position": list(REGIONS)[rng.integers(len(REGIONS))] if count == 1 else None,
    }


def draw_scene(scene: dict, rng: np.random.Generator, size: int, scale: float = 1.0) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    radius = size * scale * (rng.uniform(0.11, 0.15) if scene["count"] == 1 else rng.uniform(0.08, 0.11))
    for cx, cy in _centres(scene, rng, size, radius):
        _draw_shape(draw, scene["shape"], cx, cy, radius, COLOURS[scene["colour"]])
    return image


def _centres(scene: dict, rng: np.random.Generator, size: int, radius: float) -> list[tuple[float, float]]:
    if scene["count"] == 1:
        fx, fy = REGIONS[scene["position"]]
        jitter = rng.uniform(-0.04, 0.04, size=2) * size
        # Clipped so that a large shape stays whole inside the image (still well within its region).
        cx, cy = np.clip(np.array([fx, fy]) * size + jitter, radius + 1, size - radius - 1)
        return [(float(cx), float(cy))]
    # One shape per quadrant, jittered inside it: shapes never touch, so the count is unambiguous
    # at any shape scale (rejection sampling stalls once three large shapes barely fit).
    half, margin = size / 4, max(2.0, 0.03 * size)
    jitter = max(0.0, half - radius - margin)
    centres = []
    for cell in rng.permutation(4)[: scene["count"]]:
        cx, cy = (2 * (cell % 2) + 1) * half, (2 * (cell // 2) + 1) * half
        dx, dy = rng.uniform(-jitter, jitter, size=2)
        centres.append((cx + dx, cy + dy))
    return centres


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        # The circle's bounding box: its corners are what tells a square from a circle at a few pixels a side.
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)


# ----------------------------------------------------------------------------- text


def answers(scene: dict) -> dict[str, str]:
    out = {"colour": scene["colour"], "shape": scene["shape"], "count": COUNT_WORDS[scene["count"]]}
    if scene["position"] is not None:
        out["position"] = scene["position"]
    return out


def caption(scene: dict) -> str:
    n = scene["count"]
    noun = scene["shape"] + ("s" if n > 1 else "")
    words = f"{'a' if n == 1 else COUNT_WORDS[n]} {scene['colour']} {noun}"
    if scene["position"] is not None:
        words += " in the centre" if scene["position"] == "centre" else f" on the {scene['position']}"
    return words


def _turn(role: str, text: str) -> dict:
    return {"from": role, "value": text}


def pretrain_record(scene: dict, image, rng, index: int) -> dict:
    prompt = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
    conversations = [_turn("human", f"<image>\n{prompt}"), _turn("gpt", caption(scene))]
    return {"id": f"pretrain-{index:06d}", "conversations": conversations, "images": [image], "meta": {}}


def sft_record(scene: dict, image, rng, index: int, questions: int | None = None) -> dict:
    """`questions` per image (every type the image answers when None), in random order."""
    truth = answers(scene)
    qtypes = rng.permutation(sorted(truth))[: questions or len(truth)]
    conversations = []
    for i, qtype in enumerate(qtypes):
        question = QUESTIONS[qtype][rng.integers(len(QUESTIONS[qtype]))]
        conversations += [_turn("human", f"<image>\n{question}" if i == 0 else question), _turn("gpt", truth[qtype])]
    return {"id": f"sft-{index:06d}", "conversations": conversations, "images": [image], "meta": {}}


def eval_record(scene: dict, image, rng, index: int) -> dict:
    truth = answers(scene)
    qtype = eval_qtype(index)
    question = QUESTIONS[qtype][rng.integers(len(QUESTIONS[qtype]))]
    conversations = [_turn("human", f"<image>\n{question}"), _turn("gpt", truth[qtype])]
    meta = {"qtype": qtype, "answer": truth[qtype]}
    return {"id": f"eval-{index:06d}", "conversations": conversations, "images": [image], "meta": meta}


def eval_qtype(index: int) -> str:
    """Held-out question types in turn, so each gets a quarter of the eval set (a meaningful %)."""
    return sorted(QUESTIONS)[index % len(QUESTIONS)]


def make_records(
    kind: str, num: int, image_size: int, seed: int, shape_scale: float = 1.0, questions: int | None = None
) -> list[dict]:
    make = {"pretrain": pretrain_record, "sft": partial(sft_record, questions=questions), "eval": eval_record}[kind]
    rng = np.random.default_rng([seed, ("pretrain", "sft", "eval").index(kind)])  # disjoint image streams
    records = []
    for index in range(num):
        if kind == "eval":
            single = eval_qtype(index) == "position"
        else:
            single = bool(rng.random() < TRAIN_FORCED_SINGLE)
        scene = random_scene(rng, single=single)
        records.append(make(scene, draw_scene(scene, rng, image_size, shape_scale), rng, index))
    return records


# ----------------------------------------------------------------------------- build


def build_demo_data(
    out_dir: str | Path,
    *,
    num_train: int = 4000,
    num_eval: int = 400,
    image_size: int = 64,
    shape_scale: float = 1.0,
    questions: int | None = None,
    seed: int = 0,
    samples_per_shard: int = 250,
) -> dict[str, Path]:
    """Write the demo shards and tokenizer; a no-op when a build with the same parameters exists.

    `num_train` samples go to each of pretrain/ and sft/."""
    out_dir = Path(out_dir)
    params = {
        "version": VERSION,
        "num_train": num_train,
        "num_eval": num_eval,
        "image_size": image_size,
        "shape_scale": shape_scale,
        "questions": questions,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
    }
    paths = {name: out_dir / name for name in ("pretrain", "sft", "eval", "tokenizer")}
    stamp = out_dir / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == params and all(p.is_dir() for p in paths.values()):
        return paths
    stamp.unlink(missing_ok=True)  # a build interrupted from here on is redone next time
    eval_per_shard = max(1, min(samples_per_shard, math.ceil(num_eval / EVAL_SHARDS)))
    texts = []
    for kind, num, per_shard in (
        ("pretrain", num_train, samples_per_shard),
        ("sft", num_train, samples_per_shard),
        ("eval", num_eval, eval_per_shard),
    ):
        records = make_records(kind, num, image_size, seed, shape_scale, questions)
        write_shards(records, paths[kind], max_samples_per_shard=per_shard)
        texts += [turn["value"] for record in records for turn in record["conversations"]]
    train_tokenizer(texts + template_texts(), paths["tokenizer"])
    stamp.write_text(json.dumps(params, indent=1) + "\n")
    return paths


def template_texts() -> list[str]:
    """Words the chat templates add around turns, so they tokenise compactly too."""
    from llava_train.data.templates import VICUNA_SYSTEM

    return [VICUNA_SYSTEM, "USER: ASSISTANT:", "system user assistant", "You are a helpful assistant."] * 20


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shape-scale", type=float, default=1.0, help="shape size factor (the demo uses 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    built = build_demo_data(
        args.out_dir, num_train=args.num_train, num_eval=args.num_eval, image_size=args.image_size,
        shape_scale=args.shape_scale, seed=args.seed,
    )
    print(json.dumps({k: str(v) for k, v in built.items()}, indent=1))
