"""`llava-train data ...`: convert datasets to shards and inspect shards.

Only argparse is imported here; the converters load when a command runs, so the main
CLI stays quick to start.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'1073741824', '512MB', '1G', '1.5GiB' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1073741824, 512MB or 1GB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def add_data_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="convert datasets to webdataset shards; inspect shards")
    sub = data.add_subparsers(dest="data_command", required=True)

    llava = sub.add_parser("convert-llava", help="LLaVA JSON/JSONL + image folder -> shards")
    llava.add_argument("data", help="LLaVA JSON (a list of records) or JSONL file")
    llava.add_argument("--image-root", default=None, help="folder of the `image` paths (default: the JSON's folder)")
    _add_convert_options(llava)

    hf = sub.add_parser("convert-hf", help="Hugging Face dataset (save_to_disk folder, parquet/JSON files) -> shards")
    hf.add_argument("inputs", nargs="+", help="a save_to_disk folder, or parquet/JSON/JSONL/arrow files or globs")
    hf.add_argument("--split", default="train", help="split of a saved DatasetDict (default: train)")
    hf.add_argument("--image-column", default=None, help="default: `image` if present, else text-only")
    hf.add_argument("--conversations-column", default="conversations")
    hf.add_argument("--question-column", default="question", help="used when there is no conversations column")
    hf.add_argument("--answer-column", default="answer")
    hf.add_argument("--id-column", default="id")
    hf.add_argument("--image-root", default=None, help="folder that image path strings are relative to")
    hf.add_argument("--cache-dir", default=None, help="datasets' cache for parquet/JSON inputs")
    _add_convert_options(hf)

    pairs = sub.add_parser("convert-pairs", help="preference pairs JSON/JSONL/parquet (+ image folder) -> shards for DPO")
    pairs.add_argument("data", nargs="+", help="JSON list, JSONL or parquet files of {id, prompt, chosen, rejected, "
                       "image(s)}; also RLAIF-V's (question, image bytes, idx) and TRL's conversational layouts")
    pairs.add_argument("--image-root", default=None, help="folder of the `image` paths (default: the JSON's folder)")
    _add_convert_options(pairs)

    inspect = sub.add_parser(
        "inspect", help="counts, image sizes, length histogram, modality mix, skipped samples and unused images"
    )
    inspect.add_argument("patterns", nargs="+", help="shard folder, file, glob or brace pattern")
    inspect.add_argument("--tokenizer", default=None, help="tokenizer folder: lengths in tokens instead of words")
    inspect.add_argument("--template", default="vicuna_v1", help="conversation template for token lengths")


def _add_convert_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder for shards, index.json and summary.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=parse_bytes, default=1 << 30, help="e.g. 1GB (default)")
    parser.add_argument("--max-image-size", type=int, default=None, help="shrink images whose longest side exceeds PX")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder: count tokens in the summary")
    parser.add_argument("--template", default="vicuna_v1", help="conversation template for token counts")
    parser.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_data_command(args: argparse.Namespace) -> int:
    """Run a parsed `data` command; 0 on success, 1 if nothing was written, 2 on a usage error."""
    try:
        if args.data_command == "inspect":
            from data_tools.inspect_shards import inspect

            print(inspect(args.patterns, args.tokenizer, args.template))
            return 0
        summary = _convert(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from data_tools.convert_common import format_summary

    print(format_summary(summary))
    if summary["written"] == 0:
        print("error: no sample was written; see the skip reasons above", file=sys.stderr)
        return 1
    return 0


def _convert(args: argparse.Namespace) -> dict:
    from data_tools.convert_common import ConvertOptions

    options = ConvertOptions(
        out_dir=args.out,
        image_root=args.image_root,
        workers=args.workers,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        max_image_size=args.max_image_size,
        tokenizer=args.tokenizer,
        template=args.template,
        prefix=args.prefix,
        progress=not args.no_progress,
    )
    if args.data_command == "convert-llava":
        from data_tools.convert_llava import convert_llava

        return convert_llava(args.data, options)
    if args.data_command == "convert-pairs":
        from data_tools.convert_pairs import convert_pairs

        return convert_pairs(args.data, options)
    from data_tools.convert_hf import Columns, convert_hf

    columns = Columns(
        image=args.image_column,
        conversations=args.conversations_column,
        question=args.question_column,
        answer=args.answer_column,
        id=args.id_column,
    )
    return convert_hf(args.inputs, options, columns, split=args.split, cache_dir=args.cache_dir)
