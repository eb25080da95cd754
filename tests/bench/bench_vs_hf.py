"""Side by side: llava_train vs transformers' LlavaForConditionalGeneration + HF Trainer.

Same model shape (`--shape`: `cpu`, the default, is an 8-layer 512-wide Llama LM with a 32k vocabulary
and a 6-layer CLIP-style ViT at 224 px with 16-px patches; `qwen2-0.5b` is Qwen2-0.5B's LM with a
CLIP-L/336 tower; `tiny` is for smoke tests; towers frozen), same initial weights (random, from config
dicts), same LLaVA-Instruct-like data (data_tools/synthetic.py: identical JPEG bytes, identical tokens
and labels from the same template), same global batch and precision. The HF side pads to the longest
row and computes logits at every position, as LLaVA does.

Each run is a fresh subprocess (so peak memory is its own), and the two sides alternate
round by round so machine drift cancels. Prints one table; nothing is asserted.

    python tests/bench/bench_vs_hf.py --rounds 2 --steps 6 --warmup 2 [--precision bf16] [--packing]
    python tests/bench/bench_vs_hf.py --device cuda --shape qwen2-0.5b --precision bf16 --packing --zero-stage 2
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

CLIP_MEAN_STD = ((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758))
SHAPES = {
    "cpu": {  # what fits a 2-core CPU (docs/performance.md's tables)
        "vision": {
            "model_type": "clip_vision_model", "image_size": 224, "patch_size": 16, "hidden_size": 512,
            "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 8,
        },
        "lm": {
            "model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
            "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
            "max_position_embeddings": 2048, "tie_word_embeddings": False,
        },
        "max_length": 1024,
    },
    "qwen2-0.5b": {  # Qwen2-0.5B's LM with LLaVA-1.5's CLIP-L/336 tower (576 image tokens)
        "vision": {
            "model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "hidden_size": 1024,
            "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        },
        "lm": {
            "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
        "max_length": 2048,
    },
    "tiny": {  # seconds on a CPU: keeps the script working (tests/test_gpu_check.py)
        "vision": {
            "model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        },
        "lm": {
            "model_type": "qwen2", "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "tie_word_embeddings": True,
        },
        "max_length": 512,
    },
}
TEMPLATE = "vicuna_v1"


def prepare(workdir: Path, num_samples: int, shape: dict) -> dict:
    """Synthetic data at the tower's resolution and a local tokenizer with exactly the LM's vocabulary
    size (a small BPE padded with unused ids), so embedding and head have the real model's shapes."""
    from data_tools.demo_data import template_texts
    from data_tools.synthetic import build_instruct_like, vocabulary_texts
    from data_tools.tokenizer import pad_vocabulary, train_tokenizer

    size, vocab = shape["vision"]["image_size"], shape["lm"]["vocab_size"]
    paths = build_instruct_like(workdir / f"data-{size}px-{num_samples}", num_samples, image_size=size)
    tokenizer_dir = workdir / f"tokenizer-{vocab}"
    if not tokenizer_dir.is_dir():
        train_tokenizer(vocabulary_texts() + template_texts(), tokenizer_dir)
        pad_vocabulary(tokenizer_dir, vocab)
    return {**{k: str(v) for k, v in paths.items()}, "tokenizer": str(tokenizer_dir)}


def recipe_dict(paths: dict, out: Path, args) -> dict:
    shape = SHAPES[args.shape]
    data = {"train": [f"{paths['shards']}/shard-*.tar"], "template": TEMPLATE, "max_length": shape["max_length"]}
    data["image_mode"] = "resize"
    if args.packing:
        # Rows of max_length tokens; at the cpu shape's ~2.3 samples per row, 4 rows hold about the
        # same samples as the HF side's batch of 8, so both sides do comparable work per step.
        data["packing"] = True
    return {
        "model": {
            "vision": {"config": shape["vision"], "feature_layer": -2},
            "lm": {"config": shape["lm"]},
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
            "zero_stage": args.zero_stage,
            "log_every": 1,
            "progress_bar": False,
            "keep_last": 1,
            "wandb": {"mode": "disabled"},
        },
    }


# ----------------------------------------------------------------------------- the two sides


def run_ours(paths: dict, out: Path, args) -> dict:
    from llava_train.bench import summarise
    from llava_train.recipe import validate_recipe
    from llava_train.train.trainer import Trainer

    Trainer(validate_recipe(recipe_dict(paths, out, args))).train(save_final=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "loss" in r and r["step"] > args.warmup]
    report = summarise(timed)  # llava-train bench's numbers: throughput, step-time split, MFU
    keys = ("samples_per_s", "tokens_per_s", "supervised_tokens_per_s", "step_time_s", "mfu", "mfu_lm_only")
    return {**{k: report[k] for k in keys}, "data_share": report["split_s"]["data"] / report["step_time_s"]}


def build_initial_weights(paths: dict, shape: dict):
    """llava_train's model with the seed both sides share, and its HF Llava twin."""
    import torch

    from llava_train.model.build import build_model, load_tokenizer
    from llava_train.model.export import to_hf_llava
    from llava_train.recipe import ModelConfig

    tokenizer = load_tokenizer(paths["tokenizer"])
    torch.manual_seed(0)
    vision = {"config": shape["vision"], "feature_layer": -2}
    model = build_model(ModelConfig(vision=vision, lm={"config": shape["lm"]}, tokenizer="x"), tokenizer)
    return model, to_hf_llava(model), tokenizer


class LlavaJsonDataset:
    """The plain LLaVA-style dataset: a JSON list, PIL.open in __getitem__."""

    def __init__(self, paths: dict, tokenizer, tokens_per_image: int, shape: dict):
        from llava_train.data.images import ImageProcessor
        from llava_train.data.templates import get_template

        self.records = json.loads(Path(paths["json"]).read_text())
        self.image_root = Path(paths["images"])
        self.template = get_template(TEMPLATE, tokenizer)
        self.images = ImageProcessor(shape["vision"]["image_size"], *CLIP_MEAN_STD, "resize")
        self.tokens_per_image = tokens_per_image
        self.max_length = shape["max_length"]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        record = self.records[index]
        encoded = self.template.encode(record["conversations"], self.tokens_per_image, self.max_length)
        item = {"input_ids": encoded.input_ids, "labels": encoded.labels}
        if "image" in record and encoded.num_images:
            item["pixel_values"] = self.images(Image.open(self.image_root / record["image"]).convert("RGB"))
        return item


class PadToLongest:
    """Pads to the longest row and records each batch's work (batches in order: batch k is step k)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.supervised: list[int] = []
        self.tokens: list[int] = []  # real (non-pad) tokens
        self.widths: list[int] = []  # padded row length
        self.images: list[int] = []

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
        self.tokens.append(int(mask.sum()))
        self.widths.append(width)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        self.images.append(len(pixels))
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch


def run_hf(paths: dict, out: Path, args) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from llava_train.model.build import apply_stage
    from llava_train.recipe import StageConfig
    from llava_train.train.flops import StepFlops

    shape = SHAPES[args.shape]
    model, hf, tokenizer = build_initial_weights(paths, shape)
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
        use_cpu=args.device == "cpu",
        bf16=args.precision == "bf16",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    dataset = LlavaJsonDataset(paths, tokenizer, model.tokens_per_image, shape)
    trainer = Trainer(model=hf, args=training_args, train_dataset=dataset, data_collator=collator)
    trainer.add_callback(StepClock())
    trainer.train()
    seconds = step_ends[-1] - step_ends[args.warmup - 1]
    timed = slice(args.warmup, args.warmup + args.steps)
    # FLOPs as the trainer counts an unpacked batch of ours (train/flops.py): real tokens, attention over the
    # padded row, the tower's images; HF's extra work (logits at every position, the tower's last layer) is not
    # model FLOPs.
    apply_stage(model, StageConfig(name="sft"))  # StepFlops counts what requires grad
    flops = StepFlops.for_model(model)
    batches = zip(collator.tokens[timed], collator.widths[timed], collator.supervised[timed])
    flops_lm = sum(flops.lm(tokens, width, supervised) for tokens, width, supervised in batches)
    flops_vision = flops.vision(sum(collator.images[timed]))
    peak = peak_flops(args)
    return {
        "samples_per_s": args.batch * args.steps / seconds,
        "tokens_per_s": sum(collator.tokens[timed]) / seconds,
        "supervised_tokens_per_s": sum(collator.supervised[timed]) / seconds,
        "step_time_s": seconds / args.steps,
        "mfu": (flops_lm + flops_vision) / seconds / peak,
        "mfu_lm_only": flops_lm / seconds / peak,
    }


def peak_flops(args) -> float:
    """The matmul peak the trainer measures for MFU (cached: ours reads back the trainer's own number)."""
    import torch

    from llava_train.train.metrics import measure_peak_flops

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"  # the trainer's cache key
    return measure_peak_flops(dtype, device=device)


# ----------------------------------------------------------------------------- driver


def child(args) -> None:
    import torch

    paths = json.loads(Path(args.workdir, "paths.json").read_text())
    out = Path(args.workdir) / f"run-{args.child}-{time.time_ns()}"
    result = (run_ours if args.child == "ours" else run_hf)(paths, out, args)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.device == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    result["peak_tflops"] = peak_flops(args) / 1e12
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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu", help="model and data shapes (see SHAPES)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0, help="llava_train's ZeRO stage")
    parser.add_argument("--child-timeout", type=float, default=None, help="seconds per side and round")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", choices=["ours", "hf"])
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the HF side's clock starts at a warm-up step's end)")
    if args.child:
        return child(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "paths.json").write_text(json.dumps(prepare(workdir, args.samples, SHAPES[args.shape])))
    results: dict[str, list[dict]] = {"ours": [], "hf": []}
    errors: dict[str, str] = {}
    for round_index in range(args.rounds):
        order = ("ours", "hf") if round_index % 2 == 0 else ("hf", "ours")
        for side in order:
            result = run_side(side, args)
            if "error" in result:  # keep going: the other side's numbers still come back
                errors[side] = result["error"]
                print(f"round {round_index + 1} {side} failed:\n{result['error']}", flush=True)
                continue
            results[side].append(result)
            print(f"round {round_index + 1} {side}: {result}", flush=True)
    summary = {side: median_of(runs) for side, runs in results.items() if runs}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": results, "median": summary,
                                               "errors": errors}, indent=1))
    print_table(summary, args)
    if errors:
        sys.exit(f"failed: {', '.join(errors)}")


def run_side(side: str, args) -> dict:
    """One side in a fresh process: its RESULT line, or {"error": what it printed last}."""
    cmd = [sys.executable, __file__, "--child", side] + [a for a in sys.argv[1:]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.child_timeout)
    except subprocess.TimeoutExpired as exc:
        tail = exc.stderr or b""  # bytes, even with text=True
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"error": f"timed out after {args.child_timeout} s\n{tail[-3000:]}"}
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        return {"error": f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"}
    return json.loads(line[-1][len("RESULT ") :])


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


METRICS = [
    ("samples/s", "samples_per_s", "{:.2f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("supervised tokens/s", "supervised_tokens_per_s", "{:,.0f}"),
    ("step time (s)", "step_time_s", "{:.3f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("MFU, LM only", "mfu_lm_only", "{:.1%}"),
    ("peak GPU memory (GiB)", "peak_gpu_gb", "{:.2f}"),
    ("peak RSS (GiB)", "peak_rss_gb", "{:.2f}"),
]


def print_table(summary: dict, args) -> None:
    peak = next((s["peak_tflops"] for s in summary.values()), float("nan"))
    print(f"\nllava_train vs HF Llava + Trainer: shape {args.shape} on {args.device}, batch {args.batch}, "
          f"{args.precision}, ZeRO-{args.zero_stage} (ours), {args.steps} timed steps after {args.warmup} warm-up, "
          f"median of {args.rounds} alternating rounds, packing={args.packing}; "
          f"MFU against the measured {args.precision} matmul peak, {peak:.3g} TFLOP/s")
    print(f"| {'metric':<22} | {'llava_train':>12} | {'HF':>12} | {'ratio':>7} |")
    print(f"|{'-' * 24}|{'-' * 14}|{'-' * 14}|{'-' * 9}|")
    ours, hf = summary.get("ours", {}), summary.get("hf", {})
    for label, key, form in METRICS:
        if key not in ours and key not in hf:
            continue
        cells = [form.format(side[key]) if key in side else "failed" for side in (ours, hf)]
        ratio = f"{ours[key] / hf[key]:.2f}x" if key in ours and key in hf and hf[key] else ""
        print(f"| {label:<22} | {cells[0]:>12} | {cells[1]:>12} | {ratio:>7} |")


if __name__ == "__main__":
    main()
