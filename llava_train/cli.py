"""`llava-train`: train, export, generate, eval, demo, report.

The same entry point serves `llava-train ...`, `torchrun -m llava_train ...` and the
`deepspeed` launcher (whose `--local_rank` argument is accepted and ignored: the rank
comes from the environment).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _strip_launcher_args(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        kept.append(arg)
    return kept


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a recipe")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=2e-5")
    train.add_argument("--resume", default=None, help="`auto` (newest complete checkpoint) or a checkpoint path")

    export = sub.add_parser("export", help="write a Hugging Face Llava folder from a checkpoint")
    export.add_argument("checkpoint")
    export.add_argument("out")
    export.add_argument("--keep-lora", action="store_true", help="base weights + a peft adapter instead of merging")

    gen = sub.add_parser("generate", help="answer a prompt about an image")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", default=None)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--visual-tokens", type=int, default=None,
                     help="visual tokens per image for a Matryoshka connector (default: its full count)")

    ev = sub.add_parser("eval", help="answer held-out shard questions greedily; accuracy overall and per meta field")
    ev.add_argument("checkpoint", help="a checkpoint folder (RUN/checkpoints/step-N) or an exported Llava folder")
    ev.add_argument("--data", nargs="+", required=True, help="shard paths, globs or brace patterns")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--by", nargs="*", default=[], help="meta fields to break accuracy down by (e.g. qtype)")
    ev.add_argument("--out", default=None, help="output folder (default CHECKPOINT/eval)")
    ev.add_argument("--template", default=None, help="only when the checkpoint does not record its template")
    ev.add_argument("--limit", type=int, default=None, help="the first N samples only")
    ev.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    bench = sub.add_parser("bench", help="time a few steps of a recipe and split the step time")
    bench.add_argument("recipe")
    bench.add_argument("overrides", nargs="*")
    bench.add_argument("--steps", type=int, default=10)
    bench.add_argument("--warmup", type=int, default=2)

    env = sub.add_parser("env", aliases=["doctor"], help="versions, accelerator, DeepSpeed ops, world size; "
                         "warns about known-bad combinations (exit 1 if any)")
    env.add_argument("recipe", nargs="?", help="also check this recipe against the machine")
    env.add_argument("overrides", nargs="*")
    env.add_argument("--json", action="store_true")

    report = sub.add_parser("report", help="an HTML page of a run: curves, throughput, data skips, evaluation")
    report.add_argument("run_dir", help="a run folder (train.output_dir, holding metrics.jsonl)")
    report.add_argument("--out", default=None, help="where to write the page (default RUN_DIR/report.html)")

    demo = sub.add_parser("demo", help="build the coloured-shapes data, train pretrain + sft, report accuracy")
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a few steps only (a smoke test)")

    from data_tools.cli import add_data_commands  # argparse only; converters load on use

    add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_strip_launcher_args(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "train":
        from llava_train.train.preemption import record_exit_code

        return record_exit_code(_train(args))  # for launchers behind torchrun, which reports only 0 or 1
    if args.command in ("env", "doctor"):
        from llava_train.env_report import run_env

        return run_env(args.recipe, args.overrides, args.json)
    if args.command == "export":
        from llava_train.model.export import export_checkpoint

        print(f"exported to {export_checkpoint(args.checkpoint, args.out, keep_lora=args.keep_lora)}")
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "bench":
        from llava_train.bench import print_summary, run_bench

        print_summary(run_bench(args.recipe, args.overrides, args.steps, args.warmup))
        return 0
    if args.command == "data":
        from data_tools.cli import run_data_command

        return run_data_command(args)
    if args.command == "report":
        return _report(args)
    if args.command == "demo":
        from llava_train.demo import run_demo

        run_demo(args.workdir, quick=args.quick)
        return 0
    return 2


def _train(args) -> int:
    from llava_train.recipe import RecipeError, load_recipe

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    try:
        recipe = load_recipe(args.recipe, overrides)
    except RecipeError as exc:
        print(f"recipe error: {exc}", file=sys.stderr)
        return 2
    from llava_train.train.checkpoint import CheckpointError
    from llava_train.train.faults import NonFiniteLossError
    from llava_train.train.metrics import LoggerUnavailableError
    from llava_train.train.preemption import EXIT_PREEMPTED
    from llava_train.train.trainer import train

    try:
        result = train(recipe)
    except (CheckpointError, FileNotFoundError, NonFiniteLossError, LoggerUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        done = "preempted" if result.preempted else "done"
        print(f"{done}: step {result.step}, loss {result.last_loss:.4f}, checkpoint {result.checkpoint}")
    return EXIT_PREEMPTED if result.preempted else 0


def _report(args) -> int:
    from llava_train.report import ReportError, write_report

    try:
        print(f"report: {write_report(args.run_dir, args.out)}")
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _generate(args) -> int:
    from PIL import Image

    from llava_train.generate import Answerer, DecodeOptions

    answerer = Answerer.from_checkpoint(args.checkpoint, visual_budget=args.visual_tokens)
    image = Image.open(args.image) if args.image else None
    options = DecodeOptions(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    print(answerer.answer([args.prompt], [image], options)[0])
    return 0


def _eval(args) -> int:
    from pathlib import Path

    from llava_train.evaluate.answer import EvalOptions
    from llava_train.evaluate.checkpoint import evaluate_checkpoint, print_summary
    from llava_train.evaluate.questions import EvalInputError

    options = EvalOptions(args.batch_size, args.max_new_tokens, tuple(args.by))
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    try:
        summary = evaluate_checkpoint(
            args.checkpoint, args.data, options, out, args.template, args.limit, args.device,
            progress=sys.stderr.isatty(),
        )
    except (EvalInputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
