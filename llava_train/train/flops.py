"""Training FLOPs per step, for MFU with and without the vision tower.

Matmul FLOPs only (the standard 2 per multiply-add): a forward costs 2*N per token for
N matmul weights; the backward costs 2*N for activation gradients plus 2*N for weight
gradients where weights train. A frozen LM that still backpropagates to the connector
costs 4*N per token, a frozen tower under no_grad 2*N per patch. Attention adds
4*T*d per layer per token forward (QK^T and AV), scaled the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def matmul_params(module: nn.Module) -> int:
    """Weights of the Linear/Conv layers (embedding lookups are not matmuls)."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            weight = sub.weight
            total += getattr(weight, "ds_numel", weight.numel())
    return total


def _pass_factor(trains_weights: bool, needs_input_grads: bool) -> int:
    return 2 + (2 if needs_input_grads else 0) + (2 if trains_weights else 0)


@dataclass(frozen=True)
class StepFlops:
    lm_params: int
    lm_layers: int
    lm_hidden: int
    lm_factor: int
    vision_params: int
    vision_layers: int
    vision_hidden: int
    vision_tokens: int
    vision_factor: int

    @classmethod
    def for_model(cls, model, preset) -> "StepFlops":
        lm_cfg, vis_cfg = model.lm.config, model.vision.config
        head = model.output_embeddings
        head_params = getattr(head.weight, "ds_numel", head.weight.numel())
        return cls(
            # The LM head runs only at supervised positions, so leave it out of the per-token count.
            lm_params=matmul_params(model.lm) - head_params + matmul_params(model.connector),
            lm_layers=lm_cfg.num_hidden_layers,
            lm_hidden=lm_cfg.hidden_size,
            lm_factor=_pass_factor(preset.lm, needs_input_grads=preset.connector or preset.vision),
            vision_params=matmul_params(model.vision),
            vision_layers=vis_cfg.num_hidden_layers,
            vision_hidden=vis_cfg.hidden_size,
            vision_tokens=model.vision.num_patches + 1,
            vision_factor=_pass_factor(preset.vision, needs_input_grads=preset.vision),
        )

    def lm(self, tokens: int, seq_len: int = 0) -> float:
        attention = 4 * self.lm_layers * self.lm_hidden * seq_len
        return self.lm_factor / 2 * (2 * self.lm_params + attention) * tokens

    def vision(self, images: int) -> float:
        attention = 4 * self.vision_layers * self.vision_hidden * self.vision_tokens
        return self.vision_factor / 2 * (2 * self.vision_params + attention) * self.vision_tokens * images
