"""Side by side: llava_train vs transformers' LlavaForConditionalGeneration + HF Trainer.

Same model shape (`--shape`: `cpu`, the default, is an 8-layer 512-wide Llama LM with a 32k vocabulary
and a 6-layer CLIP-style ViT at 224 px with 16-px patches; `qwen2-0.5b` is Qwen2-0.5B's LM with a
CLIP-L/336 tower; `tiny` is for smoke tests; towers frozen), same initial weights (random, from config
dicts), same data, same global batch and precision. The data is LLaVA-Instruct-like synthetic data
(data_tools/synthetic.py) or, with `--llava-json F --image-root DIR`, any LLaVA-format JSON + image folder:
llava_train reads it converted by `data convert-llava` (data_tools/convert_llava.py), the HF side reads the
JSON itself; the tokenizer is trained on its texts. The HF side pads to the longest row and computes logits
at every position, as LLaVA does.

Each run is a fresh subprocess (so peak memory is its own), and the two sides alternate round by round so
machine drift cancels. `--precision both` (the default) runs bf16 (autocast on a CPU) and fp32 in one run.
Prints one table per precision with each side's step-time split (vision, LM forward, backward, optimizer,
data) and memory (peak RSS, parameters + optimizer states, the rest); nothing is asserted.

    python tests/bench/bench_vs_hf.py --rounds 2 --steps 6 --warmup 2 [--precision bf16] [--packing]
    python tests/bench/foreign_llava.py runs/foreign --num 256
    python tests/bench/bench_vs_hf.py --llava-json runs/foreign/llava_instruct.json --image-root runs/foreign/images
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


def prepare(workdir: Path, args, shape: dict) -> dict:
    """The data (synthetic at the tower's resolution, or the user's LLaVA JSON converted to shards) and a
    local tokenizer trained on its texts with exactly the LM's vocabulary size (a small BPE padded with
    unused ids), so embedding and head have the real model's shapes."""
    from data_tools.demo_data import template_texts
    from data_tools.synthetic import build_instruct_like, vocabulary_texts
    from data_tools.tokenizer import pad_vocabulary, train_tokenizer

    size, vocab = shape["vision"]["image_size"], shape["lm"]["vocab_size"]
    if args.llava_json:
        paths = convert_foreign(workdir, Path(args.llava_json), Path(args.image_root))
        texts, name = llava_texts(paths["json"]), f"tokenizer-{vocab}-{paths['shards'].name}"
    else:
        paths = build_instruct_like(workdir / f"data-{size}px-{args.samples}", args.samples, image_size=size)
        texts, name = vocabulary_texts(), f"tokenizer-{vocab}"
    tokenizer_dir = workdir / name
    if not tokenizer_dir.is_dir():
        train_tokenizer(texts + template_texts(), tokenizer_dir)
        pad_vocabulary(tokenizer_dir, vocab)
    return {**{k: str(v) for k, v in paths.items()}, "tokenizer": str(tokenizer_dir)}


def convert_foreign(workdir: Path, json_file: Path, image_root: Path) -> dict[str, Path]:
    """`llava-train data convert-llava JSON --image-root DIR`, once per JSON (by content)."""
    import hashlib

    from data_tools.convert_common import ConvertOptions
    from data_tools.convert_llava import convert_llava

    if not json_file.is_file() or not image_root.is_dir():
        raise SystemExit(f"--llava-json {json_file} must be a file and --image-root {image_root} a folder")
    shards = workdir / f"foreign-{hashlib.sha1(json_file.read_bytes()).hexdigest()[:10]}"
    if not (shards / "summary.json").is_file():
        convert_llava(json_file, ConvertOptions(out_dir=shards, image_root=image_root, progress=False))
    return {"json": json_file, "images": image_root, "shards": shards}


def llava_texts(json_file: Path) -> list[str]:
    records = json.loads(Path(json_file).read_text())
    return [turn["value"].replace("<image>", "") for record in records for turn in record["conversations"]]


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
    keys = ("samples_per_s", "tokens_per_s", "supervised_tokens_per_s", "step_time_s", "mfu", "mfu_lm_only",
            "padding_fraction")
    split = {f"time/{phase}": seconds for phase, seconds in report["split_s"].items()}
    first = next(r for r in rows if "model_state_gb/parameters" in r)  # logged once, after the first step
    states = first["model_state_gb/parameters"] + first["model_state_gb/optimizer"]
    supervised = sum(r["supervised_tokens"] for r in timed) / sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    return {**{k: report[k] for k in keys}, **split, "model_states_gb": states, "supervised_share": supervised}


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
        self.records = [r for r in self.records if "image" not in r or Path(self.image_root, r["image"]).is_file()]
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


class HfClock:
    """Where the HF Trainer's step time goes, in the phases llava_train's timer reports: the tower's
    forward (hooks on the vision tower), the rest of the forward (hooks on the model), backward (to the
    optimizer step, gradient clipping included), optimizer, and data (between one step's end and the
    next one's start). A TrainerCallback marks the step boundaries."""

    def __init__(self, model):
        from transformers import TrainerCallback

        self.marks: dict[str, list[float]] = {k: [] for k in ("step_begin", "pre_opt", "opt", "step_end")}
        self.forward = [0.0, 0.0]  # model, tower: seconds in the current step
        self.per_step: list[tuple[float, float]] = []
        clock = self

        class Marks(TrainerCallback):
            def on_step_begin(self, *_, **__):
                clock.marks["step_begin"].append(time.perf_counter())
                clock.forward = [0.0, 0.0]

            def on_pre_optimizer_step(self, *_, **__):
                clock.marks["pre_opt"].append(time.perf_counter())

            def on_optimizer_step(self, *_, **__):
                clock.marks["opt"].append(time.perf_counter())

            def on_step_end(self, *_, **__):
                clock.marks["step_end"].append(time.perf_counter())
                clock.per_step.append(tuple(clock.forward))

        self.callback = Marks()
        self._time(model, 0)
        self._time(model.model.vision_tower, 1)

    def _time(self, module, slot: int) -> None:
        started: list[float] = []
        module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self._add(slot, time.perf_counter() - started.pop()))

    def _add(self, slot: int, seconds: float) -> None:
        self.forward[slot] += seconds

    def split(self, timed: slice) -> dict:
        m = self.marks
        steps = range(len(m["step_end"]))[timed]
        mean = lambda values: statistics.median(values)  # noqa: E731 (the median, as ours reports)
        forward = [self.per_step[k][0] for k in steps]
        vision = [self.per_step[k][1] for k in steps]
        return {
            "time/vision": mean(vision),
            "time/lm_forward": mean([f - v for f, v in zip(forward, vision)]),
            "time/backward": mean([m["pre_opt"][k] - m["step_begin"][k] - f for k, f in zip(steps, forward)]),
            "time/optimizer": mean([m["opt"][k] - m["pre_opt"][k] for k in steps]),
            "time/data": mean([m["step_begin"][k] - m["step_end"][k - 1] for k in steps]),
        }


def run_hf(paths: dict, out: Path, args) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from llava_train.model.build import apply_stage
    from llava_train.recipe import StageConfig
    from llava_train.train.flops import StepFlops

    shape = SHAPES[args.shape]
    model, hf, tokenizer = build_initial_weights(paths, shape)
    hf.model.vision_tower.requires_grad_(False)
    collator = PadToLongest(tokenizer.pad_token_id)
    clock = HfClock(hf)
    step_ends = clock.marks["step_end"]

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
    trainer.add_callback(clock.callback)
    trainer.train()
    states = sum(p.numel() * p.element_size() for p in hf.parameters()) + sum(
        v.numel() * v.element_size() for state in trainer.optimizer.state.values() for v in state.values()
        if isinstance(v, torch.Tensor))
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
    supervised, real = sum(collator.supervised[timed]), sum(collator.tokens[timed])
    return {
        **clock.split(timed),
        "model_states_gb": states / 2**30,
        "supervised_share": supervised / real,
        "padding_fraction": 1 - real / sum(w * args.batch for w in collator.widths[timed]),
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

    start_gb = current_rss_gb()  # imports only: what either side needs before building anything
    paths = json.loads(Path(args.workdir, "paths.json").read_text())
    out = Path(args.workdir) / f"run-{args.child}-{time.time_ns()}"
    result = (run_ours if args.child == "ours" else run_hf)(paths, out, args)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # Activations, logits, gradients, buffers and the data pipeline at the peak.
    result["rest_gb"] = result["peak_rss_gb"] - start_gb - result["model_states_gb"]
    if args.device == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    result["peak_tflops"] = peak_flops(args) / 1e12
    print("RESULT " + json.dumps(result), flush=True)


def current_rss_gb() -> float:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/bench_vs_hf")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both",
                        help="both: bf16 (autocast on a CPU) and fp32, one table each")
    parser.add_argument("--llava-json", help="a LLaVA-format JSON to run on instead of the synthetic data")
    parser.add_argument("--image-root", help="the folder --llava-json's image paths are relative to")
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
    if bool(args.llava_json) != bool(args.image_root):
        parser.error("--llava-json and --image-root go together: the JSON and the folder its image paths start in")
    if args.child:
        return child(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "paths.json").write_text(json.dumps(prepare(workdir, args, SHAPES[args.shape])))
    precisions = ["bf16", "fp32"] if args.precision == "both" else [args.precision]
    report = {p: compare(args, p) for p in precisions}
    if args.json:  # the first precision's numbers at the top level, as gpu_check reads them
        Path(args.json).write_text(json.dumps({"args": vars(args), **report[precisions[0]], "precisions": report},
                                              indent=1))
    for precision in precisions:
        print_table(report[precision]["median"], args, precision)
    failed = sorted({f"{p} {side}" for p in precisions for side in report[p]["errors"]})
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def compare(args, precision: str) -> dict:
    """Both sides at one precision, alternating round by round: every round's results and the medians."""
    results: dict[str, list[dict]] = {"ours": [], "hf": []}
    errors: dict[str, str] = {}
    for round_index in range(args.rounds):
        order = ("ours", "hf") if round_index % 2 == 0 else ("hf", "ours")
        for side in order:
            result = run_side(side, args, precision)
            if "error" in result:  # keep going: the other side's numbers still come back
                errors[side] = result["error"]
                print(f"{precision} round {round_index + 1} {side} failed:\n{result['error']}", flush=True)
                continue
            results[side].append(result)
            print(f"{precision} round {round_index + 1} {side}: {result}", flush=True)
    summary = {side: median_of(runs) for side, runs in results.items() if runs}
    return {"rounds": results, "median": summary, "errors": errors}


def run_side(side: str, args, precision: str) -> dict:
    """One side in a fresh process: its RESULT line, or {"error": what it printed last}."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", side, "--precision", precision]  # the last one counts
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
    ("supervised / real tok", "supervised_share", "{:.1%}"),
    ("padding", "padding_fraction", "{:.1%}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("supervised tokens/s", "supervised_tokens_per_s", "{:,.0f}"),
    ("step time (s)", "step_time_s", "{:.3f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("MFU, LM only", "mfu_lm_only", "{:.1%}"),
    ("peak GPU memory (GiB)", "peak_gpu_gb", "{:.2f}"),
    ("peak RSS (GiB)", "peak_rss_gb", "{:.2f}"),
    ("  params + opt states", "model_states_gb", "{:.2f}"),
    ("  the rest above start", "rest_gb", "{:.2f}"),
    *[(f"  {phase} (ms)", f"time/{phase}", "{:.0f}") for phase in ("vision", "lm_forward", "backward", "optimizer", "data")],
]


def print_table(summary: dict, args, precision: str) -> None:
    peak = next((s["peak_tflops"] for s in summary.values()), float("nan"))
    data = f"data {args.llava_json}" if args.llava_json else "synthetic data"
    print(f"\nllava_train vs HF Llava + Trainer: shape {args.shape} on {args.device}, {data}, batch {args.batch}, "
          f"{precision}, ZeRO-{args.zero_stage} (ours), {args.steps} timed steps after {args.warmup} warm-up, "
          f"median of {args.rounds} alternating rounds, packing={args.packing}; "
          f"MFU against the measured {precision} matmul peak, {peak:.3g} TFLOP/s")
    print(f"| {'metric':<22} | {'llava_train':>12} | {'HF':>12} | {'ratio':>7} |")
    print(f"|{'-' * 24}|{'-' * 14}|{'-' * 14}|{'-' * 9}|")
    ours, hf = summary.get("ours", {}), summary.get("hf", {})
    for label, key, form in METRICS:
        if key not in ours and key not in hf:
            continue
        scale = 1000 if key.startswith("time/") else 1
        cells = [form.format(side[key] * scale) if key in side else "failed" for side in (ours, hf)]
        ratio = f"{ours[key] / hf[key]:.2f}x" if key in ours and key in hf and hf[key] else ""
        print(f"| {label:<22} | {cells[0]:>12} | {cells[1]:>12} | {ratio:>7} |")


if __name__ == "__main__":
    main()
