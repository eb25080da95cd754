"""`torchrun tests/recipe_run_probe.py JOBS.json`: train each job's recipe (with its overrides) in turn, as
`llava-train train` does, and write what this rank saw to the job's `results`/rank<N>.json
(tests/test_shipped_recipes.py reads one file per rank, never the shared stdout). One launch for all the
shipped recipes: process start-up and imports dominate a 2-step run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from llava_train.recipe import load_recipe
from llava_train.train.trainer import Trainer


def main(jobs_file: str) -> None:
    for job in json.loads(Path(jobs_file).read_text()):
        run(job["results"], job["recipe"], *job["overrides"])


def run(result_dir: str, recipe_path: str, *overrides: str) -> None:
    trainer = Trainer(load_recipe(recipe_path, list(overrides)))
    result = trainer.train()
    cfg, dist = trainer.cfg, trainer.dist
    lm_params = trainer.model.lm.named_parameters()  # ZeRO-3 partitions report their full size as ds_numel
    rows = result.step * cfg.grad_accum * cfg.micro_batch_size * dist.world_size
    report = {
        "rank": dist.rank,
        "world_size": dist.world_size,
        "step": result.step,
        "loss": result.last_loss if math.isfinite(result.last_loss) else None,
        "checkpoint": str(result.checkpoint),
        "zero_stage": trainer.engine.zero_optimization_stage(),
        "bf16": trainer.engine.bfloat16_enabled() or trainer._autocast,  # DeepSpeed's bf16 mode, or CPU autocast
        "samples_per_row": trainer.samples_seen / rows,  # over 1 only when rows are packed
        # peft adapters (`...lora_A.default.weight`), not a module's own expert tensors named lora_A
        "lora_parameters": sum(getattr(p, "ds_numel", p.numel()) for n, p in lm_params if ".lora_A." in n or ".lora_B." in n),
    }
    Path(result_dir).mkdir(parents=True, exist_ok=True)
    Path(result_dir, f"rank{trainer.dist.rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
