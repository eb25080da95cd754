"""CPU offload of a frozen second model's weights (a KD teacher): GPU memory for the student instead.

Two mechanisms, one per regime, both from their libraries:
- ZeRO-3: the model is built into partitions that live in CPU memory (`zero.Init` with `offload_param` in the
  config it is loaded with, `with_param_offload`); DeepSpeed copies a partition to the GPU when it gathers the
  parameter for a forward, whatever the engine's own config says, so the student's partitions stay on the GPU.
- ZeRO 0-2 or one process: accelerate's `cpu_offload` hooks move each submodule's weights to the GPU when it runs
  and drop them after (`stream_from_cpu`). The input embeddings and the LM head stay on the GPU: the chunked losses
  read the head's weight outside its forward, where a hook would not fire.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def with_param_offload(ds_config: dict) -> dict:
    """A copy of a ZeRO-3 config whose `zero.Init` keeps partitions in (pinned, on a GPU machine) CPU memory."""
    config = copy.deepcopy(ds_config)
    pin = torch.cuda.is_available()  # pinning needs a GPU driver; on CPU the partitions are plain CPU tensors
    config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return config


def stream_from_cpu(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Keep `model`'s weights in CPU memory (cast to `dtype`), moved to `device` a submodule at a time as it runs.

    `model` is a MultimodalLM: its `output_embeddings` and the LM's input embeddings stay resident on `device`."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    model.to(dtype=dtype)
    resident = [model.output_embeddings, model.lm.get_input_embeddings()]
    cpu_offload(model, execution_device=device)
    for module in resident:
        remove_hook_from_module(module)  # puts its weights back from accelerate's CPU copy
        module.to(device)
    return model
