"""LoRA through peft: adding adapters to the LM, merging them, and merging a saved adapter state.

A stage's checkpoint holds the LM in peft's names (`lm.base_model.model.<name>.base_layer.weight`,
`...lora_A.default.weight`, `...lora_B.default.weight`). The next stage may want the same adapters
(continue them) or none (fold them in). Folding happens on the state dict, before any weights are
loaded, so it works the same whether the receiving model is whole or ZeRO-3 partitioned.
"""

from __future__ import annotations

import torch
from torch import nn

from llava_train.recipe import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def is_peft(lm: nn.Module) -> bool:
    return hasattr(lm, "peft_config")


def lora_target_names(lm: nn.Module, suffixes: list[str]) -> list[str]:
    """Full module names inside the LM whose last component is a target suffix.

    peft receives full names, so nothing outside the decoder (never the vision tower,
    never the LM head) can be matched by accident.
    """
    head = lm.get_output_embeddings()
    names = [
        name
        for name, module in lm.named_modules()
        if isinstance(module, nn.Linear) and module is not head and name.rsplit(".", 1)[-1] in suffixes
    ]
    if not names:
        raise ValueError(f"stage.lora.target_modules {suffixes} match no Linear layer of the LM")
    return names


def add_lora(lm: nn.Module, cfg: LoraConfig) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_target_names(lm, cfg.target_modules),
        bias="none",
    )
    return get_peft_model(lm, peft_cfg)


def merge_lora_state(state: dict[str, torch.Tensor], cfg: LoraConfig, lm_prefix: str = "lm.") -> dict[str, torch.Tensor]:
    """A saved state with peft-wrapped LM names -> the plain model's names, each adapter folded in:
    W <- W + (alpha / r) * B @ A, computed in fp32."""
    scale = cfg.alpha / cfg.r
    peft_prefix = lm_prefix + PEFT_PREFIX
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if not key.startswith(peft_prefix):
            merged[key] = value
            continue
        name = lm_prefix + key[len(peft_prefix) :]
        layer, _, leaf = key.rpartition(".base_layer.")
        lora_a, lora_b = f"{layer}.lora_A.{ADAPTER}.weight", f"{layer}.lora_B.{ADAPTER}.weight"
        if layer and lora_a in state:  # a peft LoRA layer (other wrappers may also name a `base_layer`)
            name = lm_prefix + f"{layer}.{leaf}"[len(peft_prefix) :]
            if leaf == "weight":
                value = (value.float() + scale * (state[lora_b].float() @ state[lora_a].float())).to(value.dtype)
        merged[name] = value
    return merged


def saved_lora_config(meta: dict) -> LoraConfig | None:
    return LoraConfig(**meta["lora"]) if meta.get("lora") else None
