"""ZeRO-3 leaf marking: opted-in module classes become DeepSpeed leaves, nothing else does."""

from __future__ import annotations

import torch
from deepspeed.utils import z3_leaf_module
from torch import nn

from llava_train.model.zero3 import leaf_module_classes, mark_zero3_leaf_modules


class RoutedExperts(nn.Module):
    """A toy sparse block: runs only the expert the input picks (data-dependent control flow)."""

    zero3_leaf = True

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts[int(x.sum() > 0)](x)


def test_only_opted_in_classes_are_marked():
    model = nn.Sequential(nn.Linear(4, 4), RoutedExperts(), nn.Sequential(RoutedExperts()))
    assert leaf_module_classes(model) == [RoutedExperts]
    marked = mark_zero3_leaf_modules(model)
    assert len(marked) == 2 and all(isinstance(m, RoutedExperts) for m in marked)
    assert z3_leaf_module(model[1]) and z3_leaf_module(model[2][0])
    assert not z3_leaf_module(model[0]) and not z3_leaf_module(model[1].experts[0])


def test_a_model_without_leaves_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 4))
    assert mark_zero3_leaf_modules(model) == []
    assert not z3_leaf_module(model[0])
