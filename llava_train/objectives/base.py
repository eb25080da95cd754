"""What an objective is: a loss over a micro-batch plus declarations the trainer acts on.

An objective is an `nn.Module` so that it may own frozen second models (a KD teacher, a DPO
reference): they become submodules of the module DeepSpeed wraps, so ZeRO-3 partitions them like
the student, but they never require grad, never enter the optimizer (groups are built from the
student's trainable parameters only) and are never written to the model files of a checkpoint.

The trainer normalises every loss by a global count that the objective declares (`normaliser`:
supervised tokens, sequences or pairs), summed over all ranks and micro-batches before the first
backward, so the gradient does not depend on how the global batch is split.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from llava_train.registry import Registry

if TYPE_CHECKING:
    from llava_train.recipe import Recipe

Normaliser = Literal["tokens", "sequences", "pairs"]


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # summed over this micro-batch's normaliser units; the trainer divides globally
    count: int  # normaliser units (supervised tokens, sequences or pairs) in this micro-batch
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # per-micro-batch terms, added as they are
    metrics: dict[str, float] = field(default_factory=dict)


class ObjectiveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass
class BuildContext:
    """Live objects an objective may need to build itself (never in the recipe schema)."""

    recipe: "Recipe"
    tokenizer: object
    model: nn.Module  # the student / policy
    zero3_config: dict | None = None  # set under ZeRO-3: second models load straight into partitions


class Objective(nn.Module, metaclass=ABCMeta):
    name: ClassVar[str]
    Options: ClassVar[type[ObjectiveOptions]] = ObjectiveOptions
    normaliser: ClassVar[Normaliser] = "tokens"
    accepts_groups: ClassVar[bool] = False  # reads grouped examples (preference pairs)
    conflicts: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: ObjectiveOptions, build: BuildContext):
        super().__init__()
        self.options = options
        self.loss_config = build.recipe.stage.loss
        self.frozen = nn.ModuleDict()  # second models: eval mode, no grad, partitioned under ZeRO-3

    def count(self, batch) -> int:
        """This micro-batch's normaliser units, known before any forward."""
        if self.normaliser == "tokens":
            return batch.num_supervised_tokens
        if self.normaliser == "sequences":
            return batch.num_samples
        return batch.num_groups

    @abstractmethod
    def forward(self, model: nn.Module, batch) -> ObjectiveOutput:
        """Run `model` (and any second model) on `batch`; return the loss summed over its units."""

    def external_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters read outside their own module's forward (ZeRO-3 must gather them for this
        module's forward and backward): the LM heads, read directly by the chunked losses."""
        heads = [model.output_embeddings] + [m.output_embeddings for m in self.frozen.values()]
        return [head.weight for head in heads]

    def add_frozen_model(self, name: str, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        self.frozen[name] = model.eval()
        return model

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # second models stay in eval mode (no dropout), whatever the engine says
        return self

    @classmethod
    def example_options(cls, workdir) -> dict:
        """Options that run on the tests' tiny model (the composition test runs every allowed pair
        with them); `workdir` is a scratch folder for anything they need (e.g. a teacher checkpoint)."""
        return {}

    @classmethod
    def check_recipe(cls, options: ObjectiveOptions, recipe: "Recipe") -> None:
        """Cross-section rules (stage, packing, data); raise ValueError with the fix."""


OBJECTIVES = Registry("objective")
register_objective = OBJECTIVES.register
objective_class = OBJECTIVES.lookup


def build_objective(spec: dict, build: BuildContext) -> Objective:
    spec = dict(spec)
    cls = objective_class(spec.pop("type"))
    return cls(cls.Options.model_validate(spec), build)
