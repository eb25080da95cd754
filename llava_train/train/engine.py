"""Distributed setup, parameter groups, optimizer, schedule and the DeepSpeed engine."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
from torch import nn

from llava_train.recipe import Recipe


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join (or create) the process group. A plain `llava-train train` becomes a world of one.

    torchrun and the deepspeed launcher both export RANK/WORLD_SIZE/MASTER_*; gloo serves
    CPU runs, nccl GPU runs.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        _skip_shared_memory_op()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return DistInfo(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        device=device,
    )


def _skip_shared_memory_op() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory collectives op.

    DeepSpeed builds that C++ op (ninja, two compiler processes, tens of seconds to minutes,
    silently) the first time its communication backend starts on a machine, whether a run
    needs it or not. Only DeepSpeed's inference all-reduce uses it; our collectives go through
    torch.distributed (gloo on the CPU), so we mark the op incompatible and DeepSpeed skips it.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Named optimizer groups: one per attached module, then one per part, each split into decay /
    no-decay (norms, biases and other 1-D parameters get no weight decay). A module's parameters
    sit inside a part (a router inside a decoder layer) but belong to the module's group only."""
    groups: list[dict] = []
    claimed: set[int] = set()
    train = recipe.train
    for module in model.attachments:
        params = list(module.own_parameters.values())
        claimed.update(id(p) for p in params)
        lr = _first_set(module.options.lr, recipe.stage.lr.modules, train.lr)
        decay = _first_set(module.options.weight_decay, train.weight_decay)
        _add_groups(groups, f"module.{module.name}", [p for p in params if p.requires_grad], lr, decay)
    for part, submodule in model.parts().items():
        params = [p for p in submodule.parameters() if p.requires_grad and id(p) not in claimed]
        _add_groups(groups, part, params, _first_set(getattr(recipe.stage.lr, part), train.lr), train.weight_decay)
    if not groups:
        raise ValueError(
            f"stage `{recipe.stage.name}` leaves nothing trainable; set stage.trainable.{{vision,connector,lm}}"
        )
    return groups


def _add_groups(groups: list[dict], name: str, params: list[nn.Parameter], lr: float, weight_decay: float) -> None:
    decay = [p for p in params if not _is_norm_or_bias(p)]
    no_decay = [p for p in params if _is_norm_or_bias(p)]
    for members, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, ".no_decay")):
        if members:
            groups.append({"params": members, "lr": lr, "weight_decay": wd, "name": name + suffix})


def _first_set(*values):
    return next(value for value in values if value is not None)


def _is_norm_or_bias(param: torch.Tensor) -> bool:
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitions report their full shape here
    return len(shape) < 2


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(groups: list[dict], recipe: Recipe):
    optimizer = _adamw(groups, lr=recipe.train.lr, betas=recipe.train.betas)
    total = recipe.train.max_steps
    warmup = math.ceil(recipe.train.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, warmup, recipe.train.min_lr_ratio)
    )
    return optimizer, schedule


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel for floating-point tensors


def _adamw(groups: list[dict], **options) -> torch.optim.AdamW:
    """AdamW with one fused kernel per step where torch has one for these parameters' device and dtype,
    else its multi-tensor (foreach) path. torch's default on a CPU is a Python loop over parameters,
    several times slower at LLaVA sizes. Same update rule, so the states agree to rounding
    (tests/test_optimizer.py). DeepSpeed steps this object under every ZeRO stage: it swaps each group's
    parameters for fp32 partitions on the same device (the CPU under offload), which the kernel also takes."""
    params = [p for group in groups for p in group["params"]]
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, **options, **({"fused": True} if fused else {"foreach": True}))


def initialize_engine(module: nn.Module, optimizer, schedule, ds_config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    return engine
