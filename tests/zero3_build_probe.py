"""Run under torchrun: build a model whose parts come from pretrained folders with a ZeRO-3 config
and write how much of each part this rank holds (evidence that zero.Init partitioned it on load)
to OUT_DIR/rank<r>.json: a file per rank, since ranks printing to one stdout interleave."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llava_train.model.build import build_model, load_tokenizer
from llava_train.recipe import ModelConfig, TrainConfig
from llava_train.train.ds_config import build_ds_config
from llava_train.train.engine import setup_distributed


def main(vision_dir: str, lm_dir: str, tokenizer_dir: str, out_dir: str) -> None:
    dist = setup_distributed()
    ds_config = build_ds_config(TrainConfig(output_dir="unused", zero_stage=3, micro_batch_size=1), dist.world_size)
    cfg = ModelConfig(vision={"path": vision_dir}, lm={"path": lm_dir}, tokenizer=tokenizer_dir)
    model = build_model(cfg, load_tokenizer(tokenizer_dir), ds_config)
    report = {"rank": dist.rank}
    for part in ("vision", "lm"):
        params = list(getattr(model, part).parameters())
        report[part] = {
            "all_partitioned": all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in params),
            "held": sum(p.ds_tensor.numel() for p in params),
            "full": sum(p.ds_numel for p in params),
        }
    Path(out_dir, f"rank{dist.rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:5])
