"""ZeRO-3 leaf modules: for modules whose forward depends on the data (sparse experts, routers).

ZeRO-3 fetches a module's parameters when that module runs and prefetches by a recorded
trace. A mixture of experts that runs only the routed experts breaks both: ranks run
different submodules, and the trace changes every step. Marking the MoE block a *leaf*
makes DeepSpeed gather all of its parameters at once on entry, on every rank, whichever
experts the data picks. A module class opts in with a class attribute `zero3_leaf = True`;
the trainer marks every such class before the engine is built.
"""

from __future__ import annotations

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
