"""ZeRO-3 helpers: loading into partitions, one dtype for every partition, and leaf modules.

Leaf modules are for modules whose forward depends on the data (sparse experts, routers).

ZeRO-3 fetches a module's parameters when that module runs and prefetches by a recorded
trace. A mixture of experts that runs only the routed experts breaks both: ranks run
different submodules, and the trace changes every step. Marking the MoE block a *leaf*
makes DeepSpeed gather all of its parameters at once on entry, on every rank, whichever
experts the data picks. A module class opts in with a class attribute `zero3_leaf = True`;
the trainer marks every such class before the engine is built.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

LEAF_ATTRIBUTE = "zero3_leaf"


def leaf_module_classes(model: nn.Module) -> list[type[nn.Module]]:
    """Classes of submodules that declared `zero3_leaf = True`, in first-seen order."""
    seen: dict[type, None] = {}
    for module in model.modules():
        if getattr(type(module), LEAF_ATTRIBUTE, False):
            seen.setdefault(type(module), None)
    return list(seen)


def mark_zero3_leaf_modules(model: nn.Module, classes: list[type[nn.Module]] | None = None) -> list[nn.Module]:
    """Mark instances of `classes` (default: the opted-in ones) as ZeRO-3 leaves; returns them."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = leaf_module_classes(model) if classes is None else classes
    if not classes:
        return []
    return set_z3_leaf_modules(model, classes)


@contextlib.contextmanager
def partitioned_loading(ds_config: dict | None):
    """While active, transformers builds and loads models straight into ZeRO-3 partitions.

    transformers wraps `from_pretrained` in `deepspeed.zero.Init` when a live
    `HfDeepSpeedConfig` says ZeRO-3, so no rank ever holds the full weights of a model
    larger than its memory. It keeps only a weak reference: this context owns the object.
    `None` (not ZeRO-3) makes it a no-op.
    """
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    owner = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del owner


def cast_unpartitioned(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters that zero.Init did not create to `dtype`.

    DeepSpeed casts a model to its bf16 dtype only when no parameter is partitioned yet: once
    pretrained parts were loaded into bf16 partitions, it leaves the rest as built (the
    connector, parts built from a config dict: fp32), and ZeRO-3 cannot flatten partitions
    of mixed dtypes into one buffer.
    """
    for param in model.parameters():
        if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


@contextlib.contextmanager
def gathered(params: list[nn.Parameter]):
    """Read full values of possibly ZeRO-3-partitioned parameters (a no-op for plain ones)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
