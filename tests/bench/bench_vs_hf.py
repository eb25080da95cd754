"""Side by side: llava_train vs transformers' LlavaForConditionalGeneration + HF Trainer.

Same model shape (8-layer 512-wide Llama LM, 32k vocabulary; 6-layer CLIP-style ViT at
224 px, 16-px patches, frozen), same initial weights, same LLaVA-Instruct-like data
(data_tools/synthetic.py: identical JPEG bytes, identical tokens and labels from the same
template), same global batch and precision. The HF side pads to the longest row and
computes logits at every position, as LLaVA does.

Each run is a fresh subprocess (so peak RSS is its own), and the two sides alternate
round by round so machine drift cancels. Prints one table; nothing is asserted.

    python tests/bench/bench_vs_hf.py --rounds 2 --steps 6 --warmup 2 [--precision bf16] [--packing]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

VISION = {
    "model_type": "clip_vision_model",
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
}
LM = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
TEMPLATE = "vicuna_v1"
MAX_LENGTH = 1024


def prepare(workdir: Path, num_samples: int) -> dict:
    from data_tools.demo_data import template_texts
    from data_tools.synthetic import build_instruct_like, vocabulary_texts
    from data_tools.tokenizer import train_tokenizer

    paths = build_instruct_like(workdir / "data", num_samples, image_size=VISION["image_size"])
    tokenizer_dir = workdir / "tokenizer"
    if not tokenizer_dir.is_dir():
        train_tokenizer(vocabulary_texts() + template_texts(), tokenizer_dir)
    return {**{k: str(v) for k, v in paths.items()}, "tokenizer": str(tokenizer_dir)}


def recipe_dict(paths: dict, out: Path, args) -> dict:
    data = {"train": [f"{paths['shards']}/shard-*.tar"], "template": TEMPLATE, "max_length": MAX_LENGTH}
    data["image_mode"] = "resize"
    if args.packing:
        # Rows of MAX_LENGTH tokens; at this data's ~2.3 samples per row, 4 rows hold about the
        # same samples as the HF side's batch of 8, so both sides do comparable work per step.
        data["packing"] = True
    return {
        "model": {
            "vision": {"config": VISION, "feature_layer": -2},
            "lm": {"config": LM},
            "tokenizer": paths["tokenizer"],
        },
        "stage": {"name": "sft"},
        "data": data,
        "train": {
            "output_dir": str(out),
            "max_steps": args.warmup + args.steps,
            "micro_batch_size": args.packed_rows if args.packing else args.batch,
            "lr": 1e-4,
            "precision": args.precision,
            "log_every": 1,
            "progress_bar": False,
            "keep_last": 1,
            "wandb": {"mode": "disabled"},
        },
    }


# ----------------------------------------------------------------------------- the two sides


def run_ours(paths: dict, out: Path, args) -> dict:
    from llava_train.recipe import validate_recipe
    from llava_train.train.trainer import Trainer

    Trainer(validate_recipe(recipe_dict(paths, out, args))).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "loss" in r and r["step"] > args.warmup]
    seconds = sum(r["step_time_s"] for r in timed)
    samples = sum(r["samples_per_s"] * r["step_time_s"] for r in timed)  # packed rows hold several samples
    return {
        "samples_per_s": samples / seconds,
        "supervised_tokens_per_s": sum(r["supervised_tokens"] for r in timed) / seconds,
    }


def build_initial_weights(paths: dict):
    """llava_train's model with the seed both sides share, and its HF Llava twin."""
    import torch

    from llava_train.model.build import build_model, load_tokenizer
    from llava_train.model.export import to_hf_llava
    from llava_train.recipe import ModelConfig

    tokenizer = load_tokenizer(paths["tokenizer"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(vision={"config": VISION}, lm={"config": LM}, tokenizer="x"), tokenizer)
    return model, to_hf_llava(model), tokenizer


class LlavaJsonDataset:
    """The plain LLaVA-style dataset: a JSON list, PIL.open in __getitem__."""

    def __init__(self, paths: dict, tokenizer, tokens_per_image: int):
        from llava_train.data.images import ImageProcessor
        from llava_train.data.templates import get_template

        self.records = json.loads(Path(paths["json"]).read_text())
        self.image_root = Path(paths["images"])
        self.template = get_template(TEMPLATE, tokenizer)
        self.images = ImageProcessor(VISION["image_size"], (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758), "resize")
        self.tokens_per_image = tokens_per_image

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        record = self.records[index]
        encoded = self.template.encode(record["conversations"], self.tokens_per_image, MAX_LENGTH)
        item = {"input_ids": encoded.input_ids, "labels": encoded.labels}
        if "image" in record and encoded.num_images:
            item["pixel_values"] = self.images(Image.open(self.image_root / record["image"]).convert("RGB"))
        return item


class PadToLongest:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.supervised: list[int] = []

    def __call__(self, items: list[dict]) -> dict:
        import torch

        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), self.pad_id)
        labels = torch.full((len(items), width), -100)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        self.supervised.append(int((labels[:, 1:] != -100).sum()))
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch


def run_hf(paths: dict, out: Path, args) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, hf, tokenizer = build_initial_weights(paths)
    hf.model.vision_tower.requires_grad_(False)
    collator = PadToLongest(tokenizer.pad_token_id)
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a float below 1 is a ratio in transformers 5
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=args.precision == "bf16",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    dataset = LlavaJsonDataset(paths, tokenizer, model.tokens_per_image)
    trainer = Trainer(model=hf, args=training_args, train_dataset=dataset, data_collator=collator)
    trainer.add_callback(StepClock())
    trainer.train()
    seconds = step_ends[-1] - step_ends[args.warmup - 1]
    supervised = sum(collator.supervised[args.warmup : args.warmup + args.steps])
    return {"samples_per_s": args.batch * args.steps / seconds, "supervised_tokens_per_s": supervised / seconds}


# ----------------------------------------------------------------------------- driver


def child(args) -> None:
    paths = json.loads(Path(args.workdir, "paths.json").read_text())
    out = Path(args.workdir) / f"run-{args.child}-{time.time_ns()}"
    result = (run_ours if args.child == "ours" else run_hf)(paths, out, args)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/bench_vs_hf")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--packed-rows", type=int, default=4, help="llava_train rows per step when packing")
    parser.add_argument("--child", choices=["ours", "hf"])
    args = parser.parse_args()
    if args.child:
        return child(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "paths.json").write_text(json.dumps(prepare(workdir, args.samples)))
    results: dict[str, list[dict]] = {"ours": [], "hf": []}
    for round_index in range(args.rounds):
        order = ("ours", "hf") if round_index % 2 == 0 else ("hf", "ours")
        for side in order:
            cmd = [sys.executable, __file__, "--child", side] + [a for a in sys.argv[1:]]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[side].append(json.loads(line[-1][len("RESULT ") :]))
            print(f"round {round_index + 1} {side}: {results[side][-1]}", flush=True)
    print_table(results, args)


def print_table(results: dict, args) -> None:
    metrics = [("samples/s", "samples_per_s"), ("supervised tokens/s", "supervised_tokens_per_s"), ("peak RSS (GiB)", "peak_rss_gb")]
    print(f"\nllava_train vs HF Llava + Trainer: batch {args.batch}, {args.precision}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, median of {args.rounds} alternating rounds, packing={args.packing}")
    print(f"| {'metric':<22} | {'llava_train':>12} | {'HF':>12} | {'ratio':>7} |")
    print(f"|{'-' * 24}|{'-' * 14}|{'-' * 14}|{'-' * 9}|")
    for label, key in metrics:
        ours = statistics.median(r[key] for r in results["ours"])
        hf = statistics.median(r[key] for r in results["hf"])
        print(f"| {label:<22} | {ours:>12.2f} | {hf:>12.2f} | {ours / hf:>6.2f}x |")


if __name__ == "__main__":
    main()
