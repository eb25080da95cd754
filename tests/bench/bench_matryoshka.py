"""Matryoshka on the demo: one MQT model at every budget against fixed-budget models and the mlp connector.

    python tests/bench/bench_matryoshka.py [--workdir runs/bench_matryoshka] [--steps 300] [--fixed 4,16] [--m3]
                                           [--plot docs/techniques/matryoshka_budgets.png] [--setup image_tokens]

Builds the demo data with explicit parameters (data_tools.demo_data), then trains, each for the same steps on the
same samples (sft stage from scratch, tower trained, bf16 autocast, micro-batch `--batch`, no packing):
`mlp` (the LLaVA-1.5 connector, all 64 patch tokens), `mqt` (64 queries, a budget drawn per step from
1, 2, ..., 64) and `mqt_m{b}` (the same connector trained only at budget b, for each `--fixed` b); with `--m3`
also `m3_sample` and `m3_average` (M3 at scales 64/16/4/1, one scale per step or the mean loss of all four).
Each is evaluated greedily on the held-out questions (`llava-train eval`'s scoring, per qtype) at every budget it
offers. Side by side in one run, on batches of the same samples: the training step time and samples/s at each
budget (fresh models, steps interleaved across the budgets over `--rounds` rounds so machine load drifts alike;
the medians), the training FLOPs per sample and the inference prefill FLOPs per question (train/flops.py's
model: forward only, the mean eval prompt at that budget). Prints one table, writes WORKDIR/results.json and,
with `--plot`, accuracy per qtype against budget. A finished variant's checkpoint is reused on a rerun.
`--timing-only` stops after the step times and FLOPs (WORKDIR/timing.json): no training, no evaluation.

`--setup` picks the regime. `small` (default): the 64 px demo of this bench's first runs (64 patch tokens, the
tower trained, vicuna's system prompt): text is half of every sample. `image_tokens`: MQT-LLaVA's regime, where
image tokens dominate: the demo's data (tests/bench/demo_setup.py: 48 px, no system prompt), 4 px patches
(144 tokens) and a pretrained tower kept frozen (as MQT-LLaVA keeps CLIP): the tower comes from a 150-step
pretrain of the `mlp` model at that patch size (captions, tower trained), saved as a tower folder every variant
loads (`model.vision.path`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# The demo model as of this bench (recipes/demo/base.yaml), pinned so a retuned demo does not move these numbers.
VISION = {"model_type": "clip_vision_model", "image_size": 64, "patch_size": 8, "hidden_size": 128,
          "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4}
LM = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
      "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": False}
MQT = {"num_queries": 64, "heads": 4, "keys": "positions"}
SETUPS = {  # see the docstring
    "small": {"vision": VISION, "system_prompt": None, "tower_trained": True,
              "data": dict(num_train=4000, image_size=64, seed=0, samples_per_shard=250)},
    "image_tokens": {"vision": {**VISION, "image_size": 48, "patch_size": 3}, "system_prompt": "",
                     "tower_trained": False, "data": None},  # data: demo_setup.DATA
}  # fmt: skip
SCALES = [64, 16, 4, 1]
QTYPES = ("colour", "shape", "count", "position")


def variants(args) -> dict[str, tuple[str, dict]]:
    out = {"mlp": ("mlp", {}), "mqt": ("matryoshka_query", MQT)}
    out.update({f"mqt_m{b}": ("matryoshka_query", {**MQT, "budgets": [b]}) for b in args.fixed})
    if args.m3:
        out["m3_sample"] = ("matryoshka_pool", {"scales": SCALES})
        out["m3_average"] = ("matryoshka_pool", {"scales": SCALES, "scale_mode": "average"})
    return out


def recipe(args, data: dict, name: str, connector: str, options: dict, stage: str = "sft"):
    from llava_train.recipe import validate_recipe

    setup = SETUPS[args.setup]
    vision = {"path": args.tower} if args.tower else {"config": setup["vision"]}
    vision["feature_layer"] = -1
    text = {} if setup["system_prompt"] is None else {"system_prompt": setup["system_prompt"]}
    return validate_recipe({
        "model": {"vision": vision, "connector": {"type": connector, "options": options},
                  "lm": {"config": LM}, "tokenizer": str(data["tokenizer"])},
        "stage": {"name": stage, "trainable": {"vision": setup["tower_trained"] or stage == "pretrain"}},
        "data": {"train": [str(data[stage] / "shard-*.tar")], "eval": [], "max_length": 512, "image_mode": "resize",
                 "template": "plain" if stage == "pretrain" else "vicuna_v1", **text},
        "train": {"output_dir": str(args.workdir / name), "seed": 0, "micro_batch_size": args.batch, "lr": args.lr,
                  "max_steps": args.steps if stage == "sft" else 150, "precision": "bf16", "warmup_ratio": 0.05,
                  "min_lr_ratio": 0.1, "log_every": 10, "keep_last": 1, "progress_bar": False,
                  "wandb": {"mode": "disabled"}},
    })  # fmt: skip


def pretrained_tower(args, data) -> str | None:
    """`image_tokens`: the tower of a 150-step `mlp` pretrain at this patch size, saved as a tower folder; a rerun
    reuses it. `small`: None (every variant trains its own tower from scratch)."""
    from llava_train.train.trainer import Trainer

    if SETUPS[args.setup]["tower_trained"]:
        return None
    folder = args.workdir / "pretrained_tower"
    if not (folder / "config.json").is_file():
        trainer = Trainer(recipe(args, data, "tower_pretrain", "mlp", {}, stage="pretrain"))
        trainer.train()
        trainer.model.vision.encoder.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------- training and evaluation


def train(args, data, name, connector, options) -> tuple[Path, float]:
    """(the final checkpoint, training wall seconds); reused when a previous run finished it."""
    from llava_train.train.trainer import Trainer

    done = args.workdir / name / "checkpoints" / f"step-{args.steps}"
    record = args.workdir / name / "bench_train.json"
    if done.is_dir() and record.is_file():
        return done, json.loads(record.read_text())["seconds"]
    start = time.perf_counter()
    checkpoint = Trainer(recipe(args, data, name, connector, options)).train().checkpoint
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": seconds}))
    return checkpoint, seconds


def evaluate(args, data, checkpoint: Path, budgets: list) -> dict:
    """{budget: summary} on the held-out questions, per qtype."""
    from llava_train.evaluate.answer import EvalOptions
    from llava_train.evaluate.checkpoint import evaluate_budgets

    options = EvalOptions(batch_size=32, max_new_tokens=4, by=("qtype",))
    shards = [str(data["eval"] / "shard-*.tar")]
    summaries = evaluate_budgets(checkpoint, shards, options, budgets, checkpoint.parent.parent / "eval",
                                 limit=args.eval_samples, device="cpu", progress=False)
    return {s["visual_budget"]: s for s in summaries}


# ----------------------------------------------------------------------------- step time and FLOPs


class Point:
    """One (variant, budget) to time: a fresh model as the sft stage trains it, AdamW, and one batch."""

    def __init__(self, args, data, name, connector, options, budget, examples):
        from llava_train.data.collate import collate
        from llava_train.model.build import apply_stage, build_model, load_tokenizer
        from llava_train.objectives import BuildContext, build_objective
        from llava_train.train.flops import StepFlops

        r = recipe(args, data, name, connector, options)
        tokenizer = load_tokenizer(r.model.tokenizer)
        torch.manual_seed(0)
        self.model = build_model(r.model, tokenizer).train()
        apply_stage(self.model, r.stage)
        self.objective = build_objective(r.stage.objective, BuildContext(r, tokenizer, self.model)).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        spec = self.model.connector.visual_tokens()
        self.tokens = spec.num_tokens(budget)
        self.batch = collate(examples(self.model, tokenizer), tokenizer.pad_token_id, self.model.image_token_id,
                             tokens_per_image=self.tokens, visual_budget=budget)
        self.name, self.budget, self.times = name, budget, []
        self.flops = StepFlops.for_model(self.model)
        images = self.batch.pixel_values.shape[0]
        per_forward = [  # each forward runs tower, connector and LM (M3 `average`: once per scale)
            self.flops.lm(b.num_tokens, b.input_ids.shape[1], b.num_supervised_tokens) + self.flops.vision(images)
            for b in _step_batches(self.objective, self.batch, tokenizer.pad_token_id)
        ]
        self.train_flops_per_sample = sum(per_forward) / self.batch.num_samples

    def step(self) -> None:
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16):
            out = self.objective(self.model, self.batch)
        (out.loss_sum / out.count).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)


def _step_batches(objective, batch, pad_token_id: int) -> list:
    """The batches the LM runs on in one step: one per scale when the objective averages over them (M3 `average`)."""
    from llava_train.data.collate import relayout

    spec = getattr(objective, "spec", None)
    if spec is None:
        return [batch]
    old = spec.num_tokens(batch.visual_budget)
    return [relayout(batch, old, spec.num_tokens(b), b, pad_token_id) for b in spec.budgets]


def time_points(points: list[Point], rounds: int, warmup: int = 1) -> None:
    for _ in range(warmup):
        for point in points:
            point.step()
    for point in points:
        point.times.clear()
    for _ in range(rounds):  # interleaved: a load change on the machine hits every point alike
        for point in points:
            point.step()


def prefill_flops(point: Point, prompt_text_tokens: float) -> float:
    """Forward FLOPs of one question's prompt (tower, connector, LM over text + visual tokens, one logits row)."""
    from llava_train.train.flops import StepFlops

    point.model.requires_grad_(False)
    frozen = StepFlops.for_model(point.model)
    tokens = prompt_text_tokens + point.tokens
    return frozen.lm(tokens, tokens, 1) + frozen.vision(1)


def sample_examples(data, count: int, system_prompt: str | None):
    """The first `count` sft samples, encoded for the model at hand (compact spans when its count varies)."""
    text = {} if system_prompt is None else {"system_prompt": system_prompt}

    def examples(model, tokenizer):
        from itertools import islice

        from llava_train.data import pipeline
        from llava_train.data.shards import ShardStream, expand_urls
        from llava_train.recipe import DataConfig

        cfg = DataConfig(train=[str(data["sft"] / "shard-*.tar")], template="vicuna_v1", max_length=512,
                         image_mode="resize", **text)
        stream = ShardStream(expand_urls(cfg.train), pipeline.make_encoder(cfg, tokenizer, model), shuffle=False,
                             loop=False)
        return list(islice(iter(stream), count))

    return examples


def mean_prompt_text_tokens(data, limit: int, setup: dict) -> float:
    """Text tokens of the mean held-out prompt (its image spans excluded), as `llava-train eval` encodes it."""
    from llava_train.evaluate.checkpoint import Prompting, encode_questions
    from llava_train.evaluate.questions import read_records
    from llava_train.model.build import build_model, load_tokenizer
    from llava_train.recipe import ModelConfig

    tokenizer = load_tokenizer(str(data["tokenizer"]))
    model = build_model(ModelConfig(vision={"config": setup["vision"]}, lm={"config": LM}, tokenizer="unused",
                                    connector={"type": "matryoshka_query", "options": MQT}), tokenizer)
    records = read_records([str(data["eval"] / "shard-*.tar")], limit)
    text = {} if setup["system_prompt"] is None else {"system_prompt": setup["system_prompt"]}
    prompting = Prompting("vicuna_v1", {"image_mode": "resize", **text})
    questions, _, _ = encode_questions(records, prompting, tokenizer, model)
    return statistics.mean(len(q.example) - len(q.example.image_slots) for q in questions)


# ----------------------------------------------------------------------------- report


def accuracy(summary: dict | None, qtype: str | None = None) -> float | None:
    if summary is None:
        return None
    if qtype is None:
        return summary["accuracy"]
    stats = summary["by"]["qtype"].get(qtype)
    return stats["accuracy"] if stats else None


def table(rows: list[dict]) -> str:
    head = (f"{'variant':<11}{'tokens':>7}{'step ms':>9}{'samples/s':>10}{'x mlp':>7}{'train GF/sample':>16}"
            f"{'prefill GF':>11}{'x mlp':>7}{'all':>7}" + "".join(f"{q:>9}" for q in QTYPES))
    lines = [head]
    for row in rows:
        cells = [accuracy(row["eval"])] + [accuracy(row["eval"], q) for q in QTYPES]
        acc = "".join(f"{c:>{w}.1%}" if c is not None else f"{'-':>{w}}" for c, w in zip(cells, [7] + [9] * 4))
        lines.append(f"{row['variant']:<11}{row['tokens']:>7}{row['step_ms']:>9.0f}{row['samples_per_s']:>10.1f}"
                     f"{row['speedup']:>7.2f}{row['train_gflops_per_sample']:>16.3f}{row['prefill_gflops']:>11.3f}"
                     f"{row['prefill_ratio']:>7.2f}{acc}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [None, *QTYPES]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharey=True)
    for ax, qtype in zip(axes, panels):
        for family, style in (("mqt", "o-"), ("m3_sample", "s--"), ("m3_average", "^--")):
            points = [(r["tokens"], accuracy(r["eval"], qtype)) for r in rows if r["variant"] == family]
            if points:
                ax.plot(*zip(*points), style, label=f"{family} (one model)")
        fixed = [(r["tokens"], accuracy(r["eval"], qtype)) for r in rows if r["variant"].startswith("mqt_m")]
        if fixed:
            ax.plot(*zip(*fixed), "D", markersize=8, label="mqt trained at that budget only")
        ax.plot([r["tokens"] for r in rows if r["variant"] == "mlp"],
                [accuracy(r["eval"], qtype) for r in rows if r["variant"] == "mlp"], "*", markersize=12,
                label="mlp connector (every patch token)")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["tokens"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_title(qtype or "all questions")
        ax.set_xlabel("visual tokens per image")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _points_for(name: str, budget) -> tuple[tuple, tuple]:
    """(the timed point of this variant's training step, the point with its connector at this budget): a
    fixed-budget model trains as the MQT model at that budget; M3 `average` trains every scale in each step."""
    if name.startswith("mqt"):
        return ("mqt", budget), ("mqt", budget)
    if name.startswith("m3"):
        return (("m3_average", max(SCALES)) if name == "m3_average" else ("m3_sample", budget)), ("m3_sample", budget)
    return ("mlp", None), ("mlp", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_matryoshka")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fixed", type=lambda s: [int(b) for b in s.split(",")], default=[4, 16],
                        help="budgets of the separately trained fixed-budget MQT models")
    parser.add_argument("--budgets", type=lambda s: [int(b) for b in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64],
                        help="budgets the MQT model is evaluated and timed at")
    parser.add_argument("--m3", action="store_true", help="also M3 scale_mode sample against average")
    parser.add_argument("--train-samples", type=int, default=None, help="default: the setup's")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per (variant, budget), interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--timing-only", action="store_true", help="step time and FLOPs only: no training, no eval")
    parser.add_argument("--setup", choices=sorted(SETUPS), default="small", help="the regime (see the docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from data_tools.demo_data import build_demo_data
    from demo_setup import DATA

    setup = SETUPS[args.setup]
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = dict(setup["data"] or DATA, num_eval=args.eval_samples)
    if args.train_samples:
        sizes["num_train"] = args.train_samples
    data = build_demo_data(args.workdir / "data", **sizes)
    args.tower = None  # pretrained_tower's own pretrain builds its tower from scratch
    args.tower = pretrained_tower(args, data)
    specs = variants(args)
    examples = sample_examples(data, args.batch, setup["system_prompt"])
    timed = [("mlp", None)] + [("mqt", m) for m in sorted(set(args.budgets) | set(args.fixed))]
    if args.m3:
        timed += [("m3_sample", s) for s in SCALES] + [("m3_average", max(SCALES))]
    points = {(name, b): Point(args, data, name, *specs[name], b, examples) for name, b in timed}
    time_points(list(points.values()), args.rounds)
    text_tokens = mean_prompt_text_tokens(data, args.eval_samples, setup)
    print(f"\nstep time over {args.rounds} interleaved steps of {args.batch} samples; mean held-out prompt "
          f"{text_tokens:.1f} text tokens + the visual tokens")
    report(args, specs, points, text_tokens, {}, "timing.json")
    if args.timing_only:
        return
    evals, train_s = {}, {}
    for name, (connector, options) in specs.items():
        checkpoint, train_s[name] = train(args, data, name, connector, options)
        evals[name] = evaluate(args, data, checkpoint, offered(args, name, options))
    print(f"\n{args.steps} steps x {args.batch} samples each; eval on {args.eval_samples} held-out questions")
    rows = report(args, specs, points, text_tokens, evals, "results.json")
    print("training wall time (s, same steps): " + ", ".join(f"{n} {s:.0f}" for n, s in train_s.items()))
    at16 = next((r for r in rows if r["variant"] == "mqt" and r["tokens"] == 16), None)
    mlp = next(r for r in rows if r["variant"] == "mlp")
    if at16 is not None:
        colour = (accuracy(at16["eval"], "colour") - accuracy(mlp["eval"], "colour")) * 100
        print(f"target: mqt at m=16 trains {at16['speedup']:.2f}x the mlp connector's samples/s (target >= 3x); "
              f"colour {colour:+.1f} points against mlp (target within 2)")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


def offered(args, name: str, options: dict) -> list:
    """The budgets a variant is evaluated at: all it offers (the mlp connector: its fixed count)."""
    return {"mlp": [None], "mqt": args.budgets}.get(name) or options.get("budgets") or options["scales"]


def report(args, specs, points, text_tokens: float, evals: dict, filename: str) -> list[dict]:
    """Print the table (accuracy where evaluated) and write it to WORKDIR/filename; the rows."""
    base = points[("mlp", None)]
    base_ms, base_prefill = statistics.median(base.times) * 1000, prefill_flops(base, text_tokens)
    rows = []
    for name, (_, options) in specs.items():
        for budget in offered(args, name, options):
            timing, same = _points_for(name, budget)
            step_ms = statistics.median(points[timing].times) * 1000
            prefill = prefill_flops(points[same], text_tokens)
            rows.append({
                "variant": name, "budget": budget, "tokens": points[same].tokens, "step_ms": step_ms,
                "samples_per_s": args.batch / step_ms * 1000, "speedup": base_ms / step_ms,
                "train_gflops_per_sample": points[timing].train_flops_per_sample / 1e9, "prefill_gflops": prefill / 1e9,
                "prefill_ratio": base_prefill / prefill, "eval": evals.get(name, {}).get(budget),
            })
    rows.sort(key=lambda r: (list(specs).index(r["variant"]), -r["tokens"]))
    print(table(rows))
    if args.m3:
        sample_ms = statistics.mean(statistics.median(points[("m3_sample", s)].times) for s in SCALES) * 1000
        average_ms = statistics.median(points[("m3_average", max(SCALES))].times) * 1000
        print(f"M3 step time: sample {sample_ms:.0f} ms (mean over its scales), average {average_ms:.0f} ms "
              f"({average_ms / sample_ms:.2f}x)")
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "text_tokens": text_tokens,
               "rows": [{k: v for k, v in r.items() if k != "eval"} | {"accuracy": accuracy(r["eval"]),
                        **{q: accuracy(r["eval"], q) for q in QTYPES}} for r in rows]}
    (args.workdir / filename).write_text(json.dumps(results, indent=2))
    return rows


if __name__ == "__main__":
    main()
