"""Padding waste and training throughput with and without packing, on a LLaVA-Instruct-like length mix.

The mix is data_tools/synthetic.py's: 1-6 turns (median 2), questions of median 12 words,
answers log-normal with median 40 words (sigma 0.9, 1-300), one image on the first turn
except for 6% text-only samples; encoded with the vicuna_v1 template (its system prompt
included) and a word-level tokenizer.

Part 1 (planning only): padded tokens / all tokens at LLaVA-1.5 scale (576 image tokens,
max_length 2048, 16 samples per micro-batch) for plain batching, modality-length grouping,
grouping under a token budget, and packing into 2048-token rows.
Part 2 (training): a small MLLM (4-layer 256-wide Llama LM, 64 image tokens) trains on the
same samples batched plain, grouped and packed; one pass each, modes alternating per round;
real (non-pad) tokens/s, median of the rounds, and the median of each round's ratio to plain.
Nothing is asserted.

    python tests/bench/bench_packing.py --samples 4096 --train-samples 128 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llava_train.data.batch import Example  # noqa: E402
from llava_train.data.batching import BatchingConfig, plan, row_length  # noqa: E402
from llava_train.data.collate import collate_rows  # noqa: E402
from llava_train.data.templates import get_template  # noqa: E402
from llava_train.objectives.lm import supervised_positions  # noqa: E402

VISION = {
    "model_type": "clip_vision_model", "image_size": 64, "patch_size": 8, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
}
LM = {
    "model_type": "llama", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 704,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "tie_word_embeddings": False,
}


def encode_all(records: list[dict], template, image_tokens: int, max_length: int) -> list[Example]:
    examples = []
    for record in records:
        encoded = template.encode(record["conversations"], image_tokens, max_length)
        if encoded is None:
            continue
        images = [torch.zeros(3, VISION["image_size"], VISION["image_size"])] * encoded.num_images
        examples.append(Example(encoded.input_ids, encoded.labels, images=images, key=record["id"]))
    return examples


def waste(batches) -> float:
    total = sum(len(batch) * max(row_length(r) for r in batch) for batch in batches)
    real = sum(row_length(r) for batch in batches for r in batch)
    return 1 - real / total


def planned(examples, cfg: BatchingConfig):
    """Micro-batches of all examples, planned window by window as the loader does."""
    size, rng = cfg.window_size, random.Random(0)
    return [b for i in range(0, len(examples), size) for b in plan(examples[i : i + size], cfg, rng)]


def planning_modes(micro: int, max_length: int) -> dict[str, BatchingConfig]:
    return {
        "plain": BatchingConfig(micro),
        "group_by_modality_length": BatchingConfig(micro, group_by_modality_length=True),
        "grouped + token budget": BatchingConfig(
            micro, group_by_modality_length=True, max_tokens_per_batch=micro * max_length // 2
        ),
        "packing": BatchingConfig(micro // 2, packing=True, max_tokens_per_row=max_length),
    }


def train_pass(model, optimizer, batches) -> tuple[float, int]:
    """Seconds for forward + backward + step over all micro-batches; real tokens processed."""
    start, tokens = time.perf_counter(), 0
    for batch in batches:
        hidden = model(batch).hidden_states
        mask, targets = supervised_positions(batch.labels)
        logits = model.output_embeddings(hidden[:, :-1][mask])
        F.cross_entropy(logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.num_tokens
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096, help="samples for the padding table")
    parser.add_argument("--train-samples", type=int, default=192)
    parser.add_argument("--train-max-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from data_tools.synthetic import build_instruct_like, vocabulary_texts
    from data_tools.tokenizer import train_tokenizer
    from llava_train.model.build import apply_stage, build_model
    from llava_train.recipe import ModelConfig, StageConfig

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_packing_"))
    data = build_instruct_like(workdir / "input", args.samples, image_size=32)  # lengths do not depend on pixels
    records = json.loads(data["json"].read_text())
    tokenizer = train_tokenizer(vocabulary_texts(), workdir / "tokenizer")
    template = get_template("vicuna_v1", tokenizer)
    pad, image_id = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<image>")

    # Part 1: padding at LLaVA-1.5 scale
    full = encode_all(records, template, image_tokens=576, max_length=2048)
    lengths = [len(e) for e in full]
    print(f"\n{len(full)} samples: {sum(e.has_images for e in full) / len(full):.0%} with an image, tokens "
          f"median {statistics.median(lengths):.0f}, mean {statistics.mean(lengths):.0f}, max {max(lengths)}")
    print("| batching (16 samples or 8 rows of 2048 per micro-batch) | padded / all tokens | micro-batches |")
    print("|---|---:|---:|")
    for name, cfg in planning_modes(16, 2048).items():
        batches = planned(full, cfg)
        print(f"| {name} | {waste(batches):.1%} | {len(batches)} |")

    # Part 2: training throughput on a small model
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = ModelConfig(vision={"config": VISION}, lm={"config": LM}, tokenizer="unused")
    model = build_model(cfg, tokenizer)
    apply_stage(model, StageConfig(name="sft"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    small = encode_all(records, template, model.tokens_per_image, args.train_max_length)[: args.train_samples]
    modes = {name: cfg for name, cfg in planning_modes(8, args.train_max_length).items() if "budget" not in name}
    batches = {name: [collate_rows(b, pad, image_id) for b in planned(small, c)] for name, c in modes.items()}
    train_pass(model, optimizer, batches["plain"][:2])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name in modes:
            seconds, tokens = train_pass(model, optimizer, batches[name])
            rates[name].append(tokens / seconds)
    print(f"\ntraining: {len(small)} samples, max_length {args.train_max_length}, {model.tokens_per_image} image "
          f"tokens, 8 samples or 4 packed rows per micro-batch, sdpa, fp32, 1 thread, median of {args.rounds} rounds")
    print("| batching | padded / all tokens | real tokens/s | vs plain (same round) | rounds (tokens/s) |")
    print("|---|---:|---:|---:|---|")
    for name in modes:
        padded = 1 - sum(b.num_tokens for b in batches[name]) / sum(b.input_ids.numel() for b in batches[name])
        # Ratios within a round: the machine's load drifts between rounds more than within one.
        ratio = statistics.median(r / base for r, base in zip(rates[name], rates["plain"]))
        print(f"| {name} | {padded:.1%} | {statistics.median(rates[name]):.0f} | {ratio:.2f}x | "
              f"{', '.join(f'{r:.0f}' for r in rates[name])} |")


if __name__ == "__main__":
    main()
