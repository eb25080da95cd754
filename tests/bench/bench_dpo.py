"""DPO on the demo task, per reference kind: preference and answer accuracy before/after, step time and memory.

    python tests/bench/bench_dpo.py [--workdir runs/bench_dpo] [--sft-steps 300] [--dpo-steps 60]

1. Data (explicit parameters): the demo's coloured shapes (data_tools/demo_data.build_demo_data) for SFT and
   held-out questions, and preference pairs (data_tools/demo_pairs): a colour or count question, chosen = the
   right answer, rejected = a hallucinated one; train pairs and held-out pairs from disjoint image streams.
2. SFT from scratch (a model smaller than recipes/demo/base.yaml's: VISION, LM below), then DPO from that checkpoint with LoRA on the
   LM (the only trainable part), beta 0.1, once per reference kind, each run in its own process:
   `separate` (the SFT checkpoint loaded as a frozen model), `adapters_off` (the policy with its LoRA disabled),
   `precomputed` (`llava-train dpo-precompute` first, timed apart; no reference model).
   The three references are the same function, so the three runs learn the same thing; only cost differs.
3. Prints one table: preference accuracy on held-out pairs (the policy's own log p(chosen) > log p(rejected)),
   held-out answer accuracy (greedy, exact match; all questions and the colour/count ones the pairs are about),
   median step time and peak memory (the process's peak RSS on CPU; CUDA's peak allocated on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
KINDS = ("separate", "adapters_off", "precomputed")
# Smaller than the demo's model (recipes/demo/base.yaml), so SFT + 3 DPO runs fit ~15 min on 2 CPU cores.
VISION = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}  # fmt: skip
LM = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256, "tie_word_embeddings": False}


def build_data(workdir: Path, args) -> dict[str, Path]:
    from data_tools.demo_data import build_demo_data
    from data_tools.demo_pairs import build_demo_pairs

    paths = build_demo_data(workdir / "data", num_train=args.sft_samples, num_eval=args.eval_questions,
                            image_size=32, seed=0, samples_per_shard=250)  # fmt: skip
    for name, num, seed in (("pairs", args.pairs, 0), ("heldout_pairs", args.heldout_pairs, 1)):
        paths[name] = workdir / name
        if not paths[name].is_dir():
            build_demo_pairs(paths[name], num_pairs=num, image_size=32, seed=seed, samples_per_shard=100, prefix=name)
    return paths


def base_recipe(paths: dict[str, Path], out: Path, steps: int) -> dict:
    recipe = yaml.safe_load((REPO / "recipes/demo/base.yaml").read_text())
    recipe["model"]["vision"]["config"], recipe["model"]["lm"]["config"] = dict(VISION), dict(LM)
    recipe["model"]["tokenizer"] = str(paths["tokenizer"])
    recipe["data"].update(eval=[], max_length=160)
    recipe["train"].update(output_dir=str(out), max_steps=steps, progress_bar=False, log_every=1, save_every=0,
                           eval_every=0, warmup_ratio=0.05)  # fmt: skip
    return recipe


def sft_recipe(paths, out: Path, steps: int) -> dict:
    recipe = base_recipe(paths, out, steps)
    recipe["stage"] = {"name": "sft", "trainable": {"vision": True}}
    recipe["data"]["train"] = [f"{paths['sft']}/shard-*.tar"]
    recipe["train"].update(lr=2e-3, micro_batch_size=16)
    return recipe


def dpo_recipe(paths, out: Path, steps: int, sft: str, kind: str) -> dict:
    recipe = base_recipe(paths, out, steps)
    objective = {"type": "dpo", "beta": 0.1}
    if kind == "separate":
        objective["reference"] = sft
    elif kind == "precomputed":
        objective["precomputed_reference"] = True
    recipe["stage"] = {"name": "sft_lora", "init_from": sft, "trainable": {"vision": False, "connector": False},
                       "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "objective": objective}  # fmt: skip
    recipe["data"]["train"] = [f"{paths['pairs']}/shard-*.tar"]
    recipe["train"].update(lr=5e-4, micro_batch_size=8)
    return recipe


def llava_train(*args: str) -> float:
    """Run the CLI in a fresh process (its own peak memory); returns the wall time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llava_train", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llava-train {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def train(recipe: dict, name: str, workdir: Path) -> Path:
    """Train `recipe` (skipped when its final checkpoint exists); returns the checkpoint."""
    out = Path(recipe["train"]["output_dir"])
    checkpoint = out / "checkpoints" / f"step-{recipe['train']['max_steps']}"
    if not checkpoint.is_dir():
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        llava_train("train", str(path))
    return checkpoint


def step_stats(out: Path, warmup: int = 3) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_time_s" in r]
    return {"step_s": statistics.median(r["step_time_s"] for r in steps[warmup:] or steps),
            "peak_gb": max(r["peak_memory_gb"] for r in steps), "loss": steps[-1]["loss"],
            "train_pref_acc": statistics.mean(r["objective/rewards/accuracy"] for r in steps[-5:])}  # fmt: skip


def preference_accuracy(checkpoint: Path, shards: Path, data) -> float:
    """Share of held-out pairs whose chosen answer the model finds likelier than the rejected one."""
    import torch

    from llava_train.data import pipeline
    from llava_train.data.shards import expand_urls
    from llava_train.model.io import load_any
    from llava_train.objectives.dpo_precompute import shard_loader, shard_logprobs

    model, tokenizer = load_any(checkpoint)
    encoder = pipeline.make_encoder(data, tokenizer, model, accept_groups=True)
    collate_fn = pipeline.make_collate(tokenizer, model)
    wins = []
    for shard in expand_urls([f"{shards}/shard-*.tar"]):
        pairs = shard_logprobs(model, shard_loader(shard, data, 16, encoder, collate_fn), 1024, torch.device("cpu"),
                               autocast=False)  # fmt: skip
        wins += [p["chosen"]["sum"] > p["rejected"]["sum"] for p in pairs.values()]
    return sum(wins) / len(wins)


def accuracy(checkpoint: Path, paths, data) -> dict:
    from llava_train.demo import evaluate_accuracy

    report = evaluate_accuracy(checkpoint, paths["eval"], data.template)
    per_type, counts = report["accuracy"], report["eval_questions"]
    total = sum(counts.values())
    paired = [q for q in ("colour", "count") if q in per_type]
    return {"answer_acc": sum(per_type[q] * counts[q] for q in per_type) / total,
            "paired_acc": sum(per_type[q] * counts[q] for q in paired) / sum(counts[q] for q in paired),
            "pref_acc": preference_accuracy(checkpoint, paths["heldout_pairs"], data)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench_dpo")
    parser.add_argument("--sft-samples", type=int, default=3000)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--eval-questions", type=int, default=240)
    parser.add_argument("--pairs", type=int, default=800)
    parser.add_argument("--heldout-pairs", type=int, default=200)
    parser.add_argument("--dpo-steps", type=int, default=60)
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = build_data(workdir, args)
    sft = train(sft_recipe(paths, workdir / "sft", args.sft_steps), "sft", workdir)
    from llava_train.recipe import validate_recipe

    data = validate_recipe(dpo_recipe(paths, workdir / "unused", 1, str(sft), "adapters_off")).data
    rows = {"sft (before)": accuracy(sft, paths, data)}
    for kind in KINDS:
        recipe = dpo_recipe(paths, workdir / f"dpo_{kind}", args.dpo_steps, str(sft), kind)
        extra = {}
        if kind == "precomputed":
            path = workdir / "dpo_precomputed.yaml"
            path.write_text(yaml.safe_dump(recipe))
            extra["precompute_s"] = llava_train("dpo-precompute", str(path))
        checkpoint = train(recipe, f"dpo_{kind}", workdir)
        rows[f"dpo {kind}"] = {**accuracy(checkpoint, paths, data), **step_stats(workdir / f"dpo_{kind}"), **extra}
    print_table(rows, args, time.perf_counter() - started)
    (workdir / "bench_dpo.json").write_text(json.dumps(rows, indent=1))


def print_table(rows: dict, args, seconds: float) -> None:
    print(f"\nDPO on the demo: {args.pairs} train pairs, {args.dpo_steps} steps x 8 pairs, beta 0.1, LoRA r 8 "
          f"(from SFT: {args.sft_steps} steps); held-out: {args.heldout_pairs} pairs, {args.eval_questions} questions")
    header = f"{'run':<18}{'pref acc':>9}{'answer acc':>11}{'colour+count':>13}{'step s':>8}{'peak GB':>9}{'final loss':>11}"
    print(header + "\n" + "-" * len(header))
    for name, r in rows.items():
        cost = f"{r['step_s']:>8.3f}{r['peak_gb']:>9.2f}{r['loss']:>11.3f}" if "step_s" in r else f"{'':>28}"
        print(f"{name:<18}{r['pref_acc']:>9.1%}{r['answer_acc']:>11.1%}{r['paired_acc']:>13.1%}{cost}")
    pre = rows.get("dpo precomputed", {})
    if "precompute_s" in pre:
        print(f"precompute (once, reused by every later run): {pre['precompute_s']:.1f} s wall, process start included")
    print(f"total wall time {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
