"""LLaVA-MoLE's claim at small scale: plain LoRA vs MoE-LoRA on instruction data whose formats conflict.

    OMP_NUM_THREADS=1 nice -n 10 python tests/bench/moe_conflict.py [--workdir runs/moe_conflict] [--steps 60]
                                                                    [--conflict caps|swap]

Two domains ask the same questions about the demo's coloured shapes (drawn with data_tools/demo_data.py's
scene primitives, every size explicit in `DataSpec`) but want different answers, told apart only by a cue at
the end of each question: `plain` ("... Answer briefly." -> "red") against, by `--conflict`, `caps` ("... Answer
in capitals." -> "RED": a format made of words the shared start never emits) or `swap` ("... Name the other
attribute." -> the shape for a colour question, the colour for a shape question: `PARTNER`; words the shared
start already emits, so the conflict is in the mapping alone). One shared start: a pretrain (connector only, captions) and a full SFT on cue-free
questions about other images (so the LM knows the task, as LLaVA-MoLE's pretrained LLM does). From it, two
SFT runs with the same steps, lr and data, LM and tower frozen: plain LoRA (peft, r=8) on the LM's MLP
projections, and MoE-LoRA (3 experts of rank 8, top-1, one router per block) on the same projections. Prints
held-out accuracy per domain and per question type, and the fraction of each domain's tokens sent to each
expert (per layer and averaged), which it draws to docs/techniques/moe_routing.png. Results:
docs/techniques/moe.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "demo"
CUES = {"plain": "Answer briefly.", "caps": "Answer in capitals.", "swap": "Name the other attribute."}
# `swap`: the attribute answered instead of the one asked (answer words the base model already produces).
PARTNER = {"colour": "shape", "shape": "colour", "count": "colour", "position": "shape"}
EVAL_SHARDS = 8  # one per logical data stream (data/shards.py), as the demo's eval
STAMP = "moe_conflict_data.json"


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataSpec:
    """Every parameter of the variant, explicit: it draws scenes with the demo's primitives (scene sampler,
    renderer, question phrasings) but none of the demo builder's defaults, which may be retuned."""

    num_train: int = 4000
    num_eval: int = 400
    image_size: int = 64
    questions: int = 2  # question/answer turns per training image (at most the types the image answers)
    caps_fraction: float = 0.5  # the share of images in the conflicting domain
    conflict: str = "caps"  # the domain that conflicts with `plain`: caps | swap
    seed: int = 0
    samples_per_shard: int = 250


def domains(spec: DataSpec) -> tuple[str, str]:
    return ("plain", spec.conflict)


def answer_for(truth: dict[str, str], qtype: str, domain: str | None) -> str:
    """The answer `domain` wants to a `qtype` question about a scene whose answers are `truth`."""
    if domain == "caps":
        return truth[qtype].upper()
    return truth[PARTNER[qtype]] if domain == "swap" else truth[qtype]


def scenes(kind: str, num: int, spec: DataSpec):
    """(index, scene, image, rng) for `num` scenes of stream `kind`, each stream from its own seeded generator."""
    from data_tools.demo_data import draw_scene, random_scene

    rng = np.random.default_rng([spec.seed, 11, ("pretrain", "base_sft", "sft", "eval").index(kind)])
    for index in range(num):
        scene = random_scene(rng)
        yield index, scene, draw_scene(scene, rng, spec.image_size), rng


def caption_records(spec: DataSpec) -> list[dict]:
    from data_tools.demo_data import CAPTION_PROMPTS, caption

    return [
        {"id": f"pretrain-{i:06d}", "images": [image], "meta": {}, "conversations": [
            {"from": "human", "value": f"<image>\n{CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]}"},
            {"from": "gpt", "value": caption(scene)}]}
        for i, scene, image, rng in scenes("pretrain", spec.num_train, spec)
    ]


def question_records(kind: str, num: int, spec: DataSpec, domains: bool = True) -> list[dict]:
    """`spec.questions` turns per image (one for eval, with meta {qtype, answer, domain}); with `domains`,
    each image's domain is a seeded draw, every question ends with its cue and every answer takes its format."""
    from data_tools.demo_data import QUESTIONS, answers

    picker = np.random.default_rng([spec.seed, 13, ("base_sft", "sft", "eval").index(kind)])
    records = []
    for i, scene, image, rng in scenes(kind, num, spec):
        truth = answers(scene)
        qtypes = rng.permutation(sorted(truth))[: 1 if kind == "eval" else spec.questions]
        domain = (spec.conflict if picker.random() < spec.caps_fraction else "plain") if domains else None
        turns = []
        for t, qtype in enumerate(qtypes):
            question = QUESTIONS[qtype][rng.integers(len(QUESTIONS[qtype]))]
            question = f"<image>\n{question}" if t == 0 else question
            turns += [{"from": "human", "value": f"{question} {CUES[domain]}" if domain else question},
                      {"from": "gpt", "value": answer_for(truth, qtype, domain)}]
        meta = {"domain": domain} if domain else {}
        if kind == "eval":
            meta.update(qtype=str(qtypes[0]), answer=turns[1]["value"])
        records.append({"id": f"{kind}-{i:06d}", "images": [image], "meta": meta, "conversations": turns})
    return records


def build_conflict_data(out: Path, spec: DataSpec) -> Path:
    """pretrain/ (captions), base_sft/ (cue-free questions on other images: the full SFT that teaches the LM
    the task before the adapters), sft/ (the two domains mixed), eval/{plain,caps}/ and tokenizer/; reused
    when built with the same spec."""
    from data_tools.demo_data import template_texts
    from data_tools.shard_writer import write_shards
    from data_tools.tokenizer import train_tokenizer

    params = {"version": 4, **asdict(spec)}
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return out
    stamp.unlink(missing_ok=True)  # a build interrupted from here on is redone next time
    pretrain = caption_records(spec)
    base = question_records("base_sft", spec.num_train, spec, domains=False)
    sft = question_records("sft", spec.num_train, spec)
    evals = question_records("eval", spec.num_eval, spec)
    for name, records in (("pretrain", pretrain), ("base_sft", base), ("sft", sft)):
        write_shards(records, out / name, max_samples_per_shard=spec.samples_per_shard)
    shutil.rmtree(out / "eval", ignore_errors=True)  # an earlier build's other conflict must not be read as a domain
    for domain in domains(spec):
        mine = [r for r in evals if r["meta"]["domain"] == domain]
        write_shards(mine, out / "eval" / domain, max_samples_per_shard=max(1, math.ceil(len(mine) / EVAL_SHARDS)))
    texts = [turn["value"] for r in pretrain + base + sft + evals for turn in r["conversations"]]
    train_tokenizer(texts + template_texts(), out / "tokenizer")
    stamp.write_text(json.dumps(params) + "\n")
    return out


# ----------------------------------------------------------------------------- runs


def sft_variants(rank: int, experts: int, adapter_lr: float) -> dict[str, list[str]]:
    """The two SFT runs' own overrides; everything else (data, steps, lr, tower) is shared. The adapters (LoRA's
    in the `lm` part, MoE-LoRA's in its module group) train at the same `adapter_lr`."""
    targets = "[gate_proj, up_proj, down_proj]"
    return {
        "lora": ["stage.name=sft_lora", f"stage.lr.lm={adapter_lr}",
                 f"stage.lora={{r: {rank}, alpha: {2 * rank}, dropout: 0.0, target_modules: {targets}}}"],
        "moe_lora": ["stage.name=sft", "stage.trainable.lm=false", f"stage.lr.modules={adapter_lr}",
                     f"modules=[{{type: moe_lora, experts: {experts}, rank: {rank}, alpha: {2 * rank}, top_k: 1}}]"],
    }


def trained_once(recipe_file: Path, overrides: list[str], data: Path) -> Path:
    """A stage's final checkpoint, reused when its output folder already holds it from the same recipe, made
    after the data (and tokenizer) were built."""
    from llava_train.recipe import load_recipe
    from llava_train.train.trainer import Trainer

    recipe = load_recipe(recipe_file, overrides)
    out = Path(recipe.train.output_dir)
    final = out / "checkpoints" / f"step-{recipe.train.max_steps}"
    saved = out / "recipe.yaml"
    if final.is_dir() and saved.is_file() and saved.read_text() == recipe.to_yaml() and \
            final.stat().st_mtime > (data / STAMP).stat().st_mtime:
        return final
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: no earlier metrics or checkpoints
    return Trainer(recipe).train().checkpoint


def run_summary(output_dir: Path) -> dict:
    """Median step time, last logged training loss and final eval loss, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_time_s" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {"median_step_s": statistics.median(r["step_time_s"] for r in steps), "last_loss": steps[-1]["loss"],
            "eval_loss": evals[-1] if evals else float("nan"), "steps": steps[-1]["step"]}


def evaluated_once(name: str, checkpoint: Path, data: Path) -> dict:
    """A variant's accuracy (and routing, for MoE-LoRA), reused from its result.json when newer than the
    checkpoint: variants can train in separate processes and one last run assembles the report."""
    from llava_train.model.io import load_model_files
    from llava_train.recipe import load_recipe

    result_file = checkpoint.parent.parent / "result.json"
    if result_file.is_file() and result_file.stat().st_mtime > checkpoint.stat().st_mtime:
        return json.loads(result_file.read_text())
    recipe = load_recipe(checkpoint.parent.parent / "recipe.yaml")
    model, tokenizer = load_model_files(checkpoint)
    result = {"run": run_summary(checkpoint.parent.parent),
              "accuracy": accuracy(model, tokenizer, recipe.data.template, data / "eval")}
    if name == "moe_lora":
        result["routing"] = routing(model, tokenizer, recipe, data / "eval")
    result_file.write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- evaluation


def first_word(answer: str) -> str:
    words = answer.replace(".", " ").split()
    return words[0] if words else ""


def correct(answer: str, truth: str, domain: str) -> bool:
    """The first word of the answer; `plain` compares lower-cased, `caps` exactly (the format is the point)."""
    word = first_word(answer)
    return bool(word) and (word == truth if domain == "caps" else word.lower() == truth.lower())


def in_format(answer: str, domain: str, qtype: str) -> bool:
    """The answer's first word is of the kind its domain wants (right or wrong): for `caps` upper-case, for `swap`
    a word of the partner attribute, for `plain` a lower-case word of the attribute asked."""
    from data_tools.demo_pairs import ANSWERS

    word = first_word(answer)
    if domain == "caps":
        return bool(word) and word.isupper()
    return word in ANSWERS[PARTNER[qtype] if domain == "swap" else qtype]


def accuracy(model, tokenizer, template: str, eval_dir: Path, batch_size: int = 32) -> dict:
    """Greedy answers to the held-out questions: accuracy per domain and per (domain, question type), and per
    domain the share of answers in the domain's format (`{domain}/format`)."""
    from llava_train.data.images import decode_image
    from llava_train.data.shards import ShardStream, expand_urls
    from llava_train.generate import Answerer, DecodeOptions

    answerer = Answerer(model, tokenizer, template)
    hits, totals = defaultdict(int), defaultdict(int)
    for domain in present_domains(eval_dir):
        urls = expand_urls([f"{eval_dir / domain}/shard-*.tar"])
        records = list(ShardStream(urls, lambda raw: raw, shuffle=False, loop=False))
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            questions = [r["json"]["conversations"][0]["value"].replace("<image>", "").strip() for r in chunk]
            images = [decode_image(r[r["json"]["images"][0]]) for r in chunk]
            for record, answer in zip(chunk, answerer.answer(questions, images, DecodeOptions(max_new_tokens=6))):
                meta = record["json"]["meta"]
                scores = {domain: correct(answer, meta["answer"], domain),
                          f"{domain}/format": in_format(answer, domain, meta["qtype"]),
                          f"{domain}/{meta['qtype']}": correct(answer, meta["answer"], domain)}
                for key, hit in scores.items():
                    hits[key] += hit
                    totals[key] += 1
    order = lambda key: (key.split("/")[0], "/" in key, key.endswith("/format") is False, key)  # noqa: E731
    return {key: {"accuracy": hits[key] / totals[key], "n": totals[key]} for key in sorted(totals, key=order)}


def present_domains(eval_dir: Path) -> list[str]:
    """The domains the data was built with (eval/{domain}/ folders), in CUES order."""
    return [domain for domain in CUES if (eval_dir / domain).is_dir()]


def routing(model, tokenizer, recipe, eval_dir: Path, batch_size: int = 32) -> dict:
    """Fraction of each domain's tokens routed to each expert, per layer: `all` from the routers' own
    `moe/load/layer{L}/expert{E}` metrics (padding excluded), weighted by each forward's tokens, and
    `answer` (the positions that predict an answer token, the ones after the cue) from the routers' choices."""
    import torch

    from llava_train.data import pipeline
    from llava_train.modules.routing import Router

    routers = {m.name: m for m in model.modules() if isinstance(m, Router)}
    experts = next(iter(routers.values())).options.experts
    answer_mask: list[torch.Tensor] = []  # the current batch's answer positions, flattened like the routers' input
    answer_counts: dict[str, torch.Tensor] = {}

    def count_answer(router, _inputs, output):
        chosen = output[1][answer_mask[0]]
        answer_counts[router.name] = answer_counts.get(router.name, 0) + torch.bincount(chosen.reshape(-1), minlength=experts)

    hooks = [r.register_forward_hook(count_answer) for r in routers.values()]
    encoder = pipeline.make_encoder(recipe.data, tokenizer, model)
    collate_fn = pipeline.make_collate(tokenizer, model)
    out = {"all": {}, "answer": {}}
    try:
        for domain in present_domains(eval_dir):
            data = recipe.data.model_copy(update={"eval": [f"{eval_dir / domain}/shard-*.tar"]})
            load, tokens = defaultdict(float), 0
            answer_counts.clear()
            with torch.no_grad():
                for batch in pipeline.eval_loader(data, encoder, collate_fn, batch_size, rank=0, world_size=1):
                    predicts_answer = torch.zeros_like(batch.labels, dtype=torch.bool)
                    predicts_answer[:, :-1] = batch.labels[:, 1:] != -100
                    answer_mask[:] = [predicts_answer.reshape(-1)]
                    metrics = model(batch).aux_metrics
                    n = int(batch.attention_mask.sum())
                    for name, value in metrics.items():
                        if name.startswith("moe/load/"):
                            load[name] += value * n
                    tokens += n
            out["all"][domain] = {
                layer: [load[f"moe/load/{layer}/expert{e}"] / tokens for e in range(experts)] for layer in routers
            }
            out["answer"][domain] = {
                layer: (counts / counts.sum()).tolist() for layer, counts in sorted(answer_counts.items())
            }
    finally:
        for hook in hooks:
            hook.remove()
    return out


def plot_routing(matrix: dict, path: Path) -> None:
    """Experts x domains heat maps: one panel per layer plus their mean, one row per token set."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("moe_conflict.py draws its plot with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(matrix["all"])
    layers = sorted(matrix["all"][domains[0]], key=lambda name: int(name.removeprefix("layer")))
    fig, axes = plt.subplots(2, len(layers) + 1, figsize=(2.1 * (len(layers) + 1), 5.2), squeeze=False)
    for row, tokens in enumerate(("all", "answer")):
        for col, layer in enumerate([*layers, "mean"]):
            grid = np.array([mean_over_layers(matrix[tokens][d]) if layer == "mean" else matrix[tokens][d][layer]
                             for d in domains]).T  # [experts, domains]
            ax = axes[row, col]
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
            for (e, d), value in np.ndenumerate(grid):
                ax.text(d, e, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
            ax.set_xticks(range(len(domains)), domains)
            ax.set_yticks(range(grid.shape[0]), [f"expert {e}" for e in range(grid.shape[0])] if col == 0 else [])
            ax.set_title(f"{layer}\n{tokens} tokens" if col == 0 else layer, fontsize=9)
    fig.suptitle("MoE-LoRA: fraction of each domain's tokens routed to each expert")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_over_layers(per_layer: dict[str, list[float]]) -> list[float]:
    return np.mean(list(per_layer.values()), axis=0).tolist()


# ----------------------------------------------------------------------------- report


def print_report(report: dict) -> None:
    acc = report["accuracy"]
    keys = list(acc["lora"])
    print("\nheld-out accuracy (first word; caps: exact case, else lower-cased; format: the kind of answer the domain "
          "wants: caps upper-case, swap the partner attribute, plain the attribute asked)")
    print(f"| {'domain / question type':<24} | {'n':>4} | {'LoRA':>6} | {'MoE-LoRA':>8} |")
    print(f"|{'-' * 26}|{'-' * 6}|{'-' * 8}|{'-' * 10}|")
    for key in keys:
        a, b = acc["lora"][key], acc["moe_lora"][key]
        label = f"**{key}**" if "/" not in key else f"  {key}"
        print(f"| {label:<24} | {a['n']:>4} | {a['accuracy']:>6.1%} | {b['accuracy']:>8.1%} |")
    print("\nMoE-LoRA routing: fraction of each domain's tokens per expert, mean over layers")
    for tokens in ("all", "answer"):
        for domain, per_layer in report["routing"][tokens].items():
            cells = " ".join(f"{v:.2f}" for v in mean_over_layers(per_layer))
            print(f"  {tokens:<7} {domain:<6} {cells}")
    print("\ntraining (same steps, lr, data)")
    for name, run in report["runs"].items():
        print(f"  {name:<9} {run['steps']} steps, median step {run['median_step_s']:.2f} s, "
              f"final loss {run['last_loss']:.3f}, eval loss {run['eval_loss']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/moe_conflict")
    parser.add_argument("--data", default=None, help="where the data is built (default: WORKDIR/data)")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=400)
    parser.add_argument("--questions", type=int, default=2, help="question/answer turns per training image")
    parser.add_argument("--caps-fraction", type=float, default=0.5, help="the conflicting domain's share of images")
    parser.add_argument("--conflict", choices=("caps", "swap"), default="caps", help="the domain against `plain`")
    parser.add_argument("--pretrain-steps", type=int, default=120)
    parser.add_argument("--base-sft-steps", type=int, default=150,
                        help="a full SFT (LM trained) on cue-free questions between pretrain and the adapters; 0: none")
    parser.add_argument("--steps", type=int, default=60, help="SFT steps of each adapter run")
    parser.add_argument("--lr", type=float, default=1e-3, help="SFT lr of the connector and tower")
    parser.add_argument("--adapter-lr", type=float, default=2e-3, help="lr of the adapters (LoRA and MoE-LoRA alike)")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--plot", default=str(REPO / "docs" / "techniques" / "moe_routing.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="lora,moe_lora",
                        help="train/evaluate only these (e.g. one per process on a busy machine); the run with both reports")
    args = parser.parse_args()
    args.variants = args.variants.split(",")

    work = Path(args.workdir)
    spec = DataSpec(num_train=args.num_train, num_eval=args.num_eval, questions=args.questions,
                    caps_fraction=args.caps_fraction, conflict=args.conflict, seed=args.seed)
    data = build_conflict_data(Path(args.data or work / "data"), spec)
    common = [f"model.tokenizer={data / 'tokenizer'}", f"train.precision={args.precision}", f"train.seed={args.seed}",
              "train.progress_bar=false", "train.log_every=10"]
    start = trained_once(RECIPES / "pretrain.yaml", common + [
        f"data.train=[{data}/pretrain/shard-*.tar]", "data.eval=[]", f"train.max_steps={args.pretrain_steps}",
        f"train.output_dir={work / 'pretrain'}"], data)
    if args.base_sft_steps:  # an LM that already follows the demo's questions (lower-case, no cue), as LLaVA-MoLE's
        start = trained_once(RECIPES / "sft.yaml", common + [
            f"stage.init_from={start}", f"data.train=[{data}/base_sft/shard-*.tar]", "data.eval=[]",
            "train.eval_every=0", f"train.max_steps={args.base_sft_steps}", f"train.output_dir={work / 'base_sft'}"], data)
    results = {}
    for name, own in sft_variants(args.rank, args.experts, args.adapter_lr or args.lr).items():
        if name not in args.variants:
            continue
        checkpoint = trained_once(RECIPES / "sft.yaml", common + own + [
            f"stage.init_from={start}", f"stage.trainable.vision={not args.base_sft_steps}",
            f"data.train=[{data}/sft/shard-*.tar]", f"data.eval=[{data}/eval/*/shard-*.tar]", "train.eval_every=0",
            f"train.max_steps={args.steps}", f"train.lr={args.lr}", f"train.output_dir={work / name}"], data)
        results[name] = evaluated_once(name, checkpoint, data)
    if set(results) != {"lora", "moe_lora"}:
        print(f"trained and evaluated {sorted(results)}; run both variants for the report")
        return
    report = {"args": vars(args), "runs": {n: r["run"] for n, r in results.items()},
              "accuracy": {n: r["accuracy"] for n, r in results.items()}, "routing": results["moe_lora"]["routing"]}
    (work / "report.json").write_text(json.dumps(report, indent=1))
    plot_routing(report["routing"], Path(args.plot))
    print_report(report)
    print(f"\nreport: {work / 'report.json'}; plot: {args.plot}")


if __name__ == "__main__":
    main()
