"""LLaVA-Instruct-like synthetic data for benchmarks: realistic length mix, generated images.

Real LLaVA-Instruct-665K mixes short VQA answers with long descriptions and
multi-turn chats, plus ~6% text-only conversations. The generator reproduces that
shape (numbers of turns, question and answer lengths drawn from log-normal
distributions, clipped) with words from a fixed vocabulary, so a tokenizer trained on
`vocabulary_texts()` covers them. The same records are written twice: as LLaVA JSON +
an image folder (what a plain loader reads) and as webdataset shards (llava_train),
so both sides of a benchmark see identical samples and identical JPEG bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from data_tools.demo_data import draw_scene, random_scene
from data_tools.shard_writer import write_shards

WORDS = (
    "the a image shows red green blue yellow circle square triangle on left right top bottom of with "
    "and is are there in this picture describe what where how many colour shape object large small "
    "near next to above below background scene person holding table street sky tree car building "
    "window light dark bright some two three several detail please explain why because looks like"
).split()


def _length(rng: np.random.Generator, median: float, sigma: float, low: int, high: int) -> int:
    return int(np.clip(rng.lognormal(np.log(median), sigma), low, high))


def _sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=words)) + "."


def instruct_record(rng: np.random.Generator, index: int, image_size: int, text_only_fraction: float) -> dict:
    has_image = rng.random() >= text_only_fraction
    turns = _length(rng, median=2, sigma=0.6, low=1, high=6)
    conversations = []
    for turn in range(turns):
        question = _sentence(rng, _length(rng, median=12, sigma=0.5, low=3, high=60))
        if turn == 0 and has_image:
            question = "<image>\n" + question
        answer = _sentence(rng, _length(rng, median=40, sigma=0.9, low=1, high=300))
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    images = []
    if has_image:
        buffer = io.BytesIO()
        draw_scene(random_scene(rng), rng, image_size).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return {"id": f"syn-{index:07d}", "conversations": conversations, "images": images, "meta": {}}


def build_instruct_like(
    out_dir: str | Path,
    num: int,
    *,
    image_size: int = 224,
    seed: int = 0,
    text_only_fraction: float = 0.06,
    samples_per_shard: int = 256,
) -> dict[str, Path]:
    """Write `out_dir/llava.json` + `out_dir/images/` and `out_dir/shards/`; skipped if present."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "llava.json", "images": out_dir / "images", "shards": out_dir / "shards"}
    if paths["json"].is_file() and paths["shards"].is_dir():
        return paths
    rng = np.random.default_rng(seed)
    records = [instruct_record(rng, i, image_size, text_only_fraction) for i in range(num)]
    paths["images"].mkdir(parents=True, exist_ok=True)
    llava = []
    for record in records:
        entry = {"id": record["id"], "conversations": record["conversations"]}
        if record["images"]:
            entry["image"] = f"{record['id']}.jpg"
            (paths["images"] / entry["image"]).write_bytes(record["images"][0])
        llava.append(entry)
    write_shards(records, paths["shards"], max_samples_per_shard=samples_per_shard)
    paths["json"].write_text(json.dumps(llava))
    return paths


def vocabulary_texts() -> list[str]:
    return [" ".join(WORDS), *WORDS]
