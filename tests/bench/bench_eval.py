"""Generation-eval throughput: batched greedy decoding against a one-by-one loop, side by side.

The demo model (recipes/demo: 64 px tower, 64 visual tokens, 4-layer 256-wide Llama LM) answers
the demo's held-out questions with `llava-train eval`'s code (evaluate/answer.py): once one
question at a time (batch 1), once per batch size given. Random weights (or --checkpoint, a
trained demo checkpoint) and the same questions for every mode; modes alternate per round;
samples/s is the median over rounds, with each mode's ratio to the one-by-one loop. The answers
of every mode are compared with the one-by-one answers. Nothing is asserted.

    python tests/bench/bench_eval.py --questions 64 --max-new-tokens 8 --batch-sizes 8 32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def build(workdir: Path, questions: int, checkpoint: str | None):
    import torch

    from data_tools.demo_data import build_demo_data
    from llava_train.data.pipeline import make_encoder
    from llava_train.data.templates import get_template
    from llava_train.evaluate.checkpoint import NO_LIMIT
    from llava_train.evaluate.questions import QuestionEncoder, read_records
    from llava_train.model.build import build_model, load_tokenizer
    from llava_train.model.io import load_any
    from llava_train.recipe import load_recipe

    data = workdir / "data"
    build_demo_data(data, num_train=16, num_eval=questions, image_size=64)
    recipe = load_recipe(REPO / "recipes" / "demo" / "sft.yaml", [
        f"model.tokenizer={data / 'tokenizer'}", f"data.train=[{data / 'sft'}/shard-*.tar]",
        f"data.eval=[{data / 'eval'}/shard-*.tar]", f"train.output_dir={workdir / 'out'}",
    ])
    if checkpoint:
        model, tokenizer = load_any(checkpoint)
    else:
        tokenizer = load_tokenizer(recipe.model.tokenizer)
        torch.manual_seed(0)
        model = build_model(recipe.model, tokenizer, None, seed=0).eval()
    unlimited = recipe.data.model_copy(update={"max_length": NO_LIMIT})
    encoder = QuestionEncoder(make_encoder(unlimited, tokenizer, model), NO_LIMIT)
    examples = [encoder(raw).example for raw in read_records(recipe.data.eval, questions)]
    return model, tokenizer, get_template(recipe.data.template, tokenizer), examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint", default=None, help="a trained demo checkpoint (default: random weights)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from llava_train.evaluate.answer import EvalOptions, Evaluator

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, template, examples = build(Path(tmp), args.questions, args.checkpoint)
    model.to(args.device)
    evaluator = Evaluator(model, tokenizer, template, args.device)
    sizes = [1] + [b for b in args.batch_sizes if b != 1]
    evaluator.answer(examples[:2], EvalOptions(2, 2))  # warm-up: thread pools, kernels
    rates: dict[int, list[float]] = {b: [] for b in sizes}
    answers: dict[int, list[str]] = {}
    for _ in range(args.rounds):
        for b in sizes:
            start = time.perf_counter()
            answers[b] = evaluator.answer(examples, EvalOptions(b, args.max_new_tokens))
            rates[b].append(len(examples) / (time.perf_counter() - start))
    print(f"{len(examples)} demo questions, {args.max_new_tokens} new tokens at most, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'mode':<16} {'samples/s':>10} {'vs one-by-one':>14} {'same answers':>13}")
    base = statistics.median(rates[1])
    for b in sizes:
        mode = "one by one" if b == 1 else f"batch {b}"
        same = sum(a == o for a, o in zip(answers[b], answers[1]))
        print(f"{mode:<16} {statistics.median(rates[b]):>10.2f} {statistics.median(rates[b]) / base:>13.2f}x "
              f"{same:>6}/{len(examples)}")


if __name__ == "__main__":
    main()
