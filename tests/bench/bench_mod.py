"""Dense SFT against p-MoD SFT (mixture_of_depths, recipes/mod/demo_mod.yaml) from one pretrain checkpoint.

    python tests/bench/bench_mod.py [--workdir runs/bench_mod] [--pretrain-steps 150] [--sft-steps 700]
                                    [--num-train 6000] [--num-eval 400] [--threads 2]
    python tests/bench/bench_mod.py --costs-only [--rounds 5] [--set KEY=VALUE ...]   # no training: cost ratios only

One run, side by side: held-out accuracy per question type, the median training step time (steps after the
first 5, from metrics.jsonl), inference prefill FLOPs of the LM (StepFlops with every weight frozen: a forward
only, counting what each layer ran) and the KV cache after prefill (real cached slots summed over layers), both
over the held-out prompts one by one. The demo data is built here with explicit parameters, the demo's as of
this bench (48 px, shapes 1.75x; the defaults are the demo's schedule), so a retuned demo does not move them. Prints a table and writes WORKDIR/bench_mod.json.

`--costs-only` trains nothing: both variants get the same random-init weights (the demo recipes' model), and
it reports the prefill FLOPs and KV-cache ratios (which depend only on the token counts each layer keeps), the
training-step model FLOPs ratio, and the step-time ratio from forward + backward on the same SFT micro-batches,
the two variants alternating round by round (so a busy machine slows both alike). `--set` overrides recipe keys
of every stage and both variants (e.g. a deeper LM; with --costs-only a wider one and finer patches too: the
regime where a layer's matmuls dominate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
VARIANTS = {"dense": REPO / "recipes/demo/sft.yaml", "p-MoD": REPO / "recipes/mod/demo_mod.yaml"}


def train(recipe_path: Path, workdir: Path, stage: str, data_stage: str, steps: int, extra: list[str]):
    from llava_train.demo import demo_overrides
    from llava_train.recipe import load_recipe
    from llava_train.train.trainer import Trainer

    overrides = demo_overrides(workdir, data_stage, steps) + [f"train.output_dir={workdir / stage}"] + extra
    overrides += ["data.eval=[]", "train.eval_every=0"]
    recipe = load_recipe(recipe_path, overrides)
    return Trainer(recipe).train(), recipe


def median_step_time(output_dir: Path, skip: int = 5) -> float:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    times = [row["step_time_s"] for row in rows if "step_time_s" in row and row["step"] > skip]
    return statistics.median(times)


def prompts(data, model, tokenizer, eval_dir: Path, limit: int):
    """The held-out samples cut before their first answer token: one question prompt each."""
    import dataclasses

    from llava_train.data.batch import IGNORE_INDEX
    from llava_train.data.pipeline import make_encoder
    from llava_train.evaluate.questions import read_records

    encoder = make_encoder(data, tokenizer, model)
    cut = []
    for raw in read_records([f"{eval_dir}/shard-*.tar"], limit):
        example = encoder(raw)
        first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        cut.append(dataclasses.replace(example, input_ids=example.input_ids[:first], labels=example.labels[:first]))
    return cut


def prefill_costs(model, tokenizer, data, eval_dir: Path, limit: int) -> dict:
    """LM prefill FLOPs (forward only) and real KV-cache slots over `limit` held-out prompts, one per batch."""
    import torch

    from llava_train.data.collate import collate
    from llava_train.model import context
    from llava_train.modules.mixture_of_depths import CACHED_SLOTS
    from llava_train.train.flops import StepFlops

    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)  # StepFlops then counts one forward pass
    flops = StepFlops.for_model(model)
    lm_flops = kv_slots = tokens = 0
    for example in prompts(data, model, tokenizer, eval_dir, limit):
        batch = collate([example], tokenizer.pad_token_id, model.image_token_id)
        lm_flops += flops.for_batch(batch)
        tokens += batch.num_tokens
        with torch.no_grad(), context.activate(model.forward_context(batch)):
            out = model.lm(inputs_embeds=model.embed(batch), attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=True, logits_to_keep=1)
        for layer in out.past_key_values.layers:
            real = getattr(layer, CACHED_SLOTS, None)
            kv_slots += int(real.sum()) if real is not None else layer.get_seq_length()
    for param in trainable:
        param.requires_grad_(True)
    return {"prompts": limit, "prompt_tokens": tokens, "lm_prefill_flops": lm_flops, "kv_slots": kv_slots}


def build_variant(recipe_path: Path, workdir: Path, overrides: list[str] = ()):
    import torch

    from llava_train.demo import demo_overrides
    from llava_train.model.build import apply_stage, build_model, load_tokenizer
    from llava_train.modules.attach import attach_modules, release_module_parameters
    from llava_train.recipe import load_recipe

    recipe = load_recipe(recipe_path, demo_overrides(workdir, "sft", None) + ["stage.init_from=null", *overrides])
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer)
    attach_modules(model, recipe.modules)
    apply_stage(model, recipe.stage)
    release_module_parameters(model)
    return recipe, model, tokenizer


def sft_batches(recipe, model, tokenizer, workdir: Path, count: int, size: int):
    from llava_train.data.collate import collate
    from llava_train.data.pipeline import make_encoder
    from llava_train.evaluate.questions import read_records

    encoder = make_encoder(recipe.data, tokenizer, model)
    examples = [encoder(raw) for raw in read_records([f"{workdir / 'data' / 'sft'}/shard-*.tar"], count * size)]
    return [collate(examples[i:i + size], tokenizer.pad_token_id, model.image_token_id)
            for i in range(0, count * size, size)]


def costs_only(args, workdir: Path) -> None:
    import torch

    from llava_train.objectives.lm import cross_entropy_sum
    from llava_train.train.flops import StepFlops

    models = {name: build_variant(path, workdir, args.set) for name, path in VARIANTS.items()}
    recipe, dense, tokenizer = models["dense"]
    batches = sft_batches(recipe, dense, tokenizer, workdir, args.batches, recipe.train.micro_batch_size)
    results = {name: {"train_step_flops": sum(StepFlops.for_model(m).for_batch(b) for b in batches), "times": []}
               for name, (_, m, _) in models.items()}
    for _ in range(args.rounds):
        for name, (recipe, model, _) in models.items():
            model.train()
            start = time.perf_counter()
            for batch in batches:
                hidden = model(batch).hidden_states
                cross_entropy_sum(hidden, model.output_embeddings, batch.labels, recipe.stage.loss).loss.backward()
            model.zero_grad(set_to_none=True)
            results[name]["times"].append((time.perf_counter() - start) / len(batches))
    for name, (recipe, model, tokenizer) in models.items():
        results[name].update(step_time_s=statistics.median(results[name]["times"]),
                             **prefill_costs(model, tokenizer, recipe.data, workdir / "data" / "eval", args.prefill_prompts))
    dense, mod = results["dense"], results["p-MoD"]
    ratios = {key: mod[value] / dense[value] for key, value in
              [("step_time", "step_time_s"), ("train_step_flops", "train_step_flops"),
               ("lm_prefill_flops", "lm_prefill_flops"), ("kv_cache", "kv_slots")]}
    out = {"args": vars(args), "results": results, "ratios": ratios}
    (workdir / "bench_mod_costs.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({"ratios": ratios, **{n: {k: v for k, v in r.items() if k != "times"} for n, r in results.items()}},
                     indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/bench_mod")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--sft-steps", type=int, default=700)
    parser.add_argument("--num-train", type=int, default=6000)
    parser.add_argument("--num-eval", type=int, default=400)
    parser.add_argument("--prefill-prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--costs-only", action="store_true", help="no training: cost ratios on random-init weights")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides of every stage")
    args = parser.parse_args()

    import torch

    from data_tools.demo_data import build_demo_data
    from llava_train.demo import evaluate_accuracy
    from llava_train.model.io import load_any

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    start = time.perf_counter()
    build_demo_data(workdir / "data", num_train=args.num_train, num_eval=args.num_eval, image_size=48, shape_scale=1.75,
                    seed=0, samples_per_shard=250)
    if args.costs_only:
        return costs_only(args, workdir)
    pretrain, _ = train(REPO / "recipes/demo/pretrain.yaml", workdir, "pretrain", "pretrain", args.pretrain_steps,
                        args.set)  # fmt: skip
    results = {}
    for name, recipe in VARIANTS.items():
        stage = f"sft_{name.lower().replace('-', '')}"
        run, trained = train(recipe, workdir, stage, "sft", args.sft_steps,
                             [f"stage.init_from={pretrain.checkpoint}", *args.set])  # fmt: skip
        report = evaluate_accuracy(run.checkpoint, workdir / "data" / "eval", template="vicuna_v1")
        results[name] = {
            "accuracy": report["accuracy"],
            "eval_questions": report["eval_questions"],
            "final_loss": run.last_loss,
            "step_time_s": median_step_time(workdir / stage),
            **prefill_costs(*load_any(run.checkpoint), trained.data, workdir / "data" / "eval", args.prefill_prompts),
        }
    dense, mod = results["dense"], results["p-MoD"]
    ratios = {
        "step_time": mod["step_time_s"] / dense["step_time_s"],
        "lm_prefill_flops": mod["lm_prefill_flops"] / dense["lm_prefill_flops"],
        "kv_cache": mod["kv_slots"] / dense["kv_slots"],
    }
    out = {"args": vars(args), "results": results, "ratios": ratios, "wall_s": round(time.perf_counter() - start, 1)}
    (workdir / "bench_mod.json").write_text(json.dumps(out, indent=2))
    print_table(results, ratios)


def print_table(results: dict, ratios: dict) -> None:
    qtypes = sorted(results["dense"]["accuracy"])
    print(f"\n{'':<22}" + "".join(f"{name:>12}" for name in results) + f"{'p-MoD/dense':>14}")
    for qtype in qtypes:
        print(f"{'accuracy ' + qtype:<22}" + "".join(f"{r['accuracy'][qtype]:>12.1%}" for r in results.values()))
    print(f"{'final train loss':<22}" + "".join(f"{r['final_loss']:>12.3f}" for r in results.values()))
    rows = [("step time (s)", "step_time_s", "step_time"), ("LM prefill GFLOPs", "lm_prefill_flops", "lm_prefill_flops"),
            ("KV cache slots", "kv_slots", "kv_cache")]
    for label, key, ratio in rows:
        scale = 1e-9 if key == "lm_prefill_flops" else 1
        values = "".join(f"{r[key] * scale:>12.3f}" for r in results.values())
        print(f"{label:<22}{values}{ratios[ratio]:>14.3f}")


if __name__ == "__main__":
    main()
