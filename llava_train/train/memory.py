"""Bytes of model states (parameters, gradients, optimizer states) this rank holds.

Process RSS on the CPU mixes in activations, allocator caches and libraries; ZeRO's
promise is about model states, so count those directly: every distinct tensor storage
reachable from the module's parameters (their ZeRO-3 partition when partitioned), the
inner optimizer's parameters (ZeRO's flat fp32 partitions), their gradients and the
optimizer's state tensors.
"""

from __future__ import annotations

import torch


def model_state_bytes(engine) -> dict[str, int]:
    seen: set[int] = set()
    counts = {"parameters": 0, "gradients": 0, "optimizer": 0}

    def add(kind: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        counts[kind] += storage.nbytes()

    for param in engine.module.parameters():
        add("parameters", getattr(param, "ds_tensor", param.data))
        add("gradients", param.grad)
    inner = _inner_optimizer(engine.optimizer)
    for group in inner.param_groups:
        for param in group["params"]:
            add("parameters", param.data)  # fp32 master partitions
            add("gradients", param.grad)
    for state in inner.state.values():
        for value in state.values():
            add("optimizer", value)
    counts["total"] = sum(counts.values())
    return counts


def _inner_optimizer(optimizer):
    """The torch optimizer inside DeepSpeed's ZeRO wrappers."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
