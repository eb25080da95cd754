"""Connectors map vision features into the LM's embedding space.

A registry keeps them pluggable: later connectors (Matryoshka query transformer,
nested pooling) register here. Every connector answers `visual_tokens()` (how many tokens it
emits per image at each budget, data/visual_tokens.py) and takes `forward(features,
budget=None)`, emitting `visual_tokens().num_tokens(budget)` tokens per image.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llava_train.data.visual_tokens import VisualTokens

CONNECTORS: dict[str, type[nn.Module]] = {}


def register_connector(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in CONNECTORS:
            raise ValueError(f"connector `{name}` is already registered by {CONNECTORS[name].__name__}")
        CONNECTORS[name] = cls
        return cls

    return decorator


def build_connector(name: str, vision_hidden: int, lm_hidden: int, num_features: int, **options) -> nn.Module:
    if name not in CONNECTORS:
        raise ValueError(f"unknown connector `{name}`; registered connectors: {', '.join(sorted(CONNECTORS))}")
    return CONNECTORS[name](vision_hidden=vision_hidden, lm_hidden=lm_hidden, num_features=num_features, **options)


@register_connector("mlp")
class MLPConnector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: Linear -> GELU -> Linear, one output token per patch.

    Parameter names match transformers' `LlavaMultiModalProjector` so export is a copy.
    """

    def __init__(self, vision_hidden: int, lm_hidden: int, num_features: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, lm_hidden, bias=bias)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(lm_hidden, lm_hidden, bias=bias)
        self.num_output_tokens = num_features

    def visual_tokens(self) -> VisualTokens:
        return VisualTokens.fixed(self.num_output_tokens)

    def forward(self, features: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        self.visual_tokens().num_tokens(budget)  # a fixed count: any budget but None is refused, with the reason
        return self.linear_2(self.act(self.linear_1(features)))
