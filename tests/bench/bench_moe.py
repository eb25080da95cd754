"""Step time and peak memory of MoE-LoRA against plain LoRA, side by side in one run.

    python tests/bench/bench_moe.py [--steps 10] [--experts 3] [--rank 8] [--batch 8] [--seq 320] [--rounds 1]

Each variant trains the demo-shaped LM (recipes/demo/base.yaml: 4 layers x 256 wide, random weights) on the
same random token batches with AdamW, LM frozen, adapters on the MLP projections, in its own subprocess (so peak
RSS is its own; step memory = peak RSS minus RSS after setup): `lora` (peft, r), `moe_lora_dense` (E experts of rank r, top-1, block router; every expert on
every token as two rank-E*r matmuls, masked: the default) and `moe_lora_sparse` (only the routed pairs, gathered
per expert). Prints the median step time, step memory and ratios to lora; with `--rounds N` every variant runs
N times, in a rotated order each round, and the table holds medians over rounds.
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
VARIANTS = ("lora", "moe_lora_dense", "moe_lora_sparse")


def build_variant(variant: str, lm_cfg: dict, experts: int, rank: int):
    """The LM (frozen) with its adapters on the MLP projections, and the adapters' parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llava_train.model.lora import add_lora
    from llava_train.modules import build_module
    from llava_train.recipe import LoraConfig

    lm_cfg = dict(lm_cfg)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(lm_cfg.pop("model_type"), **lm_cfg))
    lm.requires_grad_(False)
    targets = ["gate_proj", "up_proj", "down_proj"]
    if variant == "lora":
        lm = add_lora(lm, LoraConfig(r=rank, alpha=2 * rank, dropout=0.0, target_modules=targets))
    else:
        holder = type("Holder", (), {"lm": lm, "attachments": []})()  # just enough of MultimodalLM for attach
        module = build_module({"type": "moe_lora", "experts": experts, "rank": rank, "alpha": 2 * rank,
                               "dispatch": variant.rsplit("_", 1)[-1]})
        module.attach_to(holder)
    return lm, [p for p in lm.parameters() if p.requires_grad]


def train_step(lm, optimizer, ids):
    """One AdamW step on text-only rows. Each forward gets its own context, as MultimodalLM.forward does: a
    context reused across steps would keep every step's aux losses (and their graphs) alive."""
    import torch

    from llava_train.data.batch import TokenRole
    from llava_train.model import context

    rows, seq = ids.shape
    roles = torch.full(ids.shape, int(TokenRole.TEXT), dtype=torch.int8)
    ctx = context.ForwardContext(roles, torch.zeros(ids.shape, dtype=torch.long), torch.arange(seq).expand(rows, seq),
                                 torch.zeros(0, dtype=torch.long), 1, False)
    with context.activate(ctx):
        out = lm(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ctx


def run_variant(args) -> dict:
    import psutil
    import torch
    import yaml

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lm_cfg = yaml.safe_load((REPO / "recipes/demo/base.yaml").read_text())["model"]["lm"]["config"]
    lm, params = build_variant(args.variant, lm_cfg, args.experts, args.rank)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, lm.config.vocab_size, (args.batch, args.seq))
    gc_before = psutil.Process().memory_info().rss  # imports and weights: not what the step costs
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        train_step(lm, optimizer, ids)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "variant": args.variant,
        "step_ms": 1000 * statistics.median(times),
        "step_mem_gb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - gc_before) / 2**30,
        "trainable_params": sum(p.numel() for p in params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="each variant this many times, order rotated per round")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a subprocess
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    runs = {variant: [] for variant in VARIANTS}
    for round_ in range(args.rounds):  # rotated order each round: load drift on a shared machine hits all alike
        for variant in VARIANTS[round_ % 3:] + VARIANTS[: round_ % 3]:
            cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.rounds} round(s); medians over rounds; ratios are medians of each round's ratio to lora")
    print(f"{'variant':<16}{'trainable':>12}{'step ms':>10}{'x lora':>8}{'step mem GB':>13}{'x lora':>8}")
    for variant, rows in runs.items():
        def median(key, ratio=False):
            values = [r[key] / (b[key] if ratio else 1) for r, b in zip(rows, runs["lora"])]
            return statistics.median(values)

        print(f"{variant:<16}{rows[0]['trainable_params']:>12,}{median('step_ms'):>10.1f}"
              f"{median('step_ms', True):>8.2f}{median('step_mem_gb'):>13.3f}{median('step_mem_gb', True):>8.2f}")

if __name__ == "__main__":
    main()
