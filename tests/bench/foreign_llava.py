"""A LLaVA-Instruct-shaped JSON + image folder that the project's own generators did not write.

For `bench_vs_hf.py --llava-json`: questions and answers about coloured shapes in plain English
(not data_tools' word lists), COCO-style ids and nested image paths (`coco/train2017/....jpg`),
multi-turn conversations whose answers range from one word to a few paragraphs, `<image>` in the
first human turn (sometimes after the question, as in LLaVA-Instruct), and ~8% text-only records
without an `image` key. Images are 224 px JPEGs drawn with PIL.

    python tests/bench/foreign_llava.py OUT_DIR --num 256     # -> OUT_DIR/llava_instruct.json, OUT_DIR/images/
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLOURS = {"crimson": (200, 20, 60), "teal": (0, 128, 128), "amber": (255, 191, 0), "violet": (138, 43, 226),
           "olive": (128, 128, 0), "navy": (0, 0, 128), "coral": (255, 127, 80), "ivory": (255, 255, 240)}
SHAPES = ["circle", "square", "triangle", "hexagon", "star", "diamond"]
PLACES = ["upper left", "upper right", "lower left", "lower right", "centre"]
ANCHORS = {"upper left": (0.25, 0.25), "upper right": (0.75, 0.25), "lower left": (0.25, 0.75),
           "lower right": (0.75, 0.75), "centre": (0.5, 0.5)}
FILLER = [sentence.rstrip(". ") + "." for sentence in (
    "Looking more closely, the edges are slightly blurred, which suggests the picture was resized. "
    "The background has a soft gradient, so the contrast between the objects and the backdrop varies. "
    "Overall the composition is balanced, and nothing overlaps in a way that would hide another object. "
    "If you were to count them again you would get the same answer, since each one is clearly separated."
).split(". ")]
TEXT_ONLY = [
    ("Can you explain what a hexagon is?", "A hexagon is a polygon with six sides and six angles."),
    ("Write a short poem about the colour teal.", "Teal is the sea at evening, green thinking about blue."),
    ("How many sides does a triangle have, and why is it rigid?",
     "Three. Its shape is fixed by the lengths of its sides, so it cannot deform without one changing."),
]


def scene(rng: random.Random) -> list[tuple[str, str, str]]:
    places = rng.sample(PLACES, rng.randint(1, 4))
    return [(rng.choice(list(COLOURS)), rng.choice(SHAPES), place) for place in places]


def draw(objects: list[tuple[str, str, str]], rng: random.Random, size: int = 224) -> Image.Image:
    top, bottom = (tuple(rng.randint(0, 255) for _ in range(3)) for _ in range(2))
    ramp = Image.linear_gradient("L").resize((size, size))  # a vertical gradient backdrop
    image = Image.composite(Image.new("RGB", (size, size), bottom), Image.new("RGB", (size, size), top), ramp)
    pen = ImageDraw.Draw(image)
    for colour, shape, place in objects:
        cx, cy = (int(a * size) for a in ANCHORS[place])
        r = rng.randint(size // 12, size // 6)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse(box, fill=fill)
        elif shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            sides = {"triangle": 3, "hexagon": 6, "star": 5, "diamond": 4}[shape]
            pen.regular_polygon((cx, cy, r), sides, rotation=rng.randint(0, 90), fill=fill)
    return image.filter(ImageFilter.GaussianBlur(rng.choice([0, 0.5, 1.0])))


def turns(objects: list[tuple[str, str, str]], rng: random.Random) -> list[tuple[str, str]]:
    colour, shape, place = rng.choice(objects)
    pool = [
        (f"What colour is the {shape}?", colour if rng.random() < 0.5 else f"The {shape} is {colour}."),
        ("How many shapes are there?", f"There are {len(objects)} shapes in the image."),
        (f"What is in the {place} of the image?", f"A {colour} {shape}."),
        ("Describe the image in detail.", describe(objects, rng)),
        (f"Is there a {rng.choice(SHAPES)} in the picture? Answer with yes or no.", rng.choice(["Yes", "No"])),
        ("What could this image be used for?",
         "It could be used to teach children the names of shapes and colours. " + " ".join(rng.sample(FILLER, 2))),
    ]
    return rng.sample(pool, rng.randint(1, 5))


def describe(objects: list[tuple[str, str, str]], rng: random.Random) -> str:
    parts = [f"In the {place} there is a {colour} {shape}." for colour, shape, place in objects]
    return " ".join(parts + rng.sample(FILLER, rng.randint(0, len(FILLER))) * rng.randint(1, 3))


def record(index: int, rng: random.Random, image_dir: Path) -> dict:
    coco_id = f"{rng.randint(1, 581929):012d}"
    if rng.random() < 0.08:
        question, answer = rng.choice(TEXT_ONLY)
        return {"id": f"text-{index}", "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}
    objects = scene(rng)
    rel = f"coco/train2017/{coco_id}.jpg"
    (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    draw(objects, rng).save(image_dir / rel, quality=rng.choice([75, 90, 95]))
    conversations = []
    for turn, (question, answer) in enumerate(turns(objects, rng)):
        if turn == 0:  # LLaVA-Instruct puts the placeholder before or after the first question
            question = f"<image>\n{question}" if rng.random() < 0.7 else f"{question}\n<image>"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": coco_id, "image": rel, "conversations": conversations}


def build(out_dir: str | Path, num: int, seed: int = 0) -> dict[str, Path]:
    """Write OUT/llava_instruct.json and OUT/images/ (skipped if the JSON exists)."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "llava_instruct.json", "images": out_dir / "images"}
    if paths["json"].is_file():
        return paths
    rng = random.Random(seed)
    paths["images"].mkdir(parents=True, exist_ok=True)
    records = [record(i, rng, paths["images"]) for i in range(num)]
    paths["json"].write_text(json.dumps(records, indent=1))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out_dir, args.num, args.seed))
