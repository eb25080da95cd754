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
    device: torch.device = torch.device("cpu")  # where the step runs
    weights_dtype: torch.dtype = torch.float32  # the dtype the engine keeps the student's weights in


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
        # Second models streamed from CPU memory (model/offload.py): a plain dict, outside the module tree, since
        # the engine moves its module to the device whole.
        self.streamed: dict[str, nn.Module] = {}
        # ...and never in a state dict: DeepSpeed's engine checkpoint (`module` of ZeRO 0-2) would otherwise
        # write the whole teacher at every save. A resume rebuilds them from their own files instead.
        self.register_state_dict_post_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_forgive_missing_frozen_keys)

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

    def add_frozen_model(self, name: str, model: nn.Module, stream_with: BuildContext | None = None) -> nn.Module:
        """Register a second model. `stream_with`: keep its weights in CPU memory, moved to the build's device (in
        its weights' dtype) a submodule at a time; not under ZeRO-3, where `model.offload.with_param_offload` is
        the config to load it with."""
        model.requires_grad_(False)
        model.eval()
        if stream_with is None:
            self.frozen[name] = model
            return model
        from llava_train.model.offload import stream_from_cpu

        self.streamed[name] = stream_from_cpu(model, stream_with.device, stream_with.weights_dtype)
        return model

    def frozen_model(self, name: str) -> nn.Module:
        return self.frozen[name] if name in self.frozen else self.streamed[name]

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # second models stay in eval mode (no dropout), whatever the engine says
        return self

    @classmethod
    def example_options(cls, workdir) -> dict:
        """Options that run on the tests' tiny model (the composition test runs every allowed pair
        with them); `workdir` is a scratch folder for anything they need (e.g. a teacher checkpoint), holding
        the run's tokenizer at `workdir/tokenizer`."""
        return {}

    @classmethod
    def check_recipe(cls, options: ObjectiveOptions, recipe: "Recipe") -> None:
        """Cross-section rules (stage, packing, data); raise ValueError with the fix."""


def _drop_frozen_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "frozen.")]:
        del state_dict[key]


def _forgive_missing_frozen_keys(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ".frozen." not in f".{k}"]


OBJECTIVES = Registry("objective")
register_objective = OBJECTIVES.register
objective_class = OBJECTIVES.lookup


def build_objective(spec: dict, build: BuildContext) -> Objective:
    """The stage's objective; averaged over visual budgets when the connector asks (budget_average.py)."""
    from llava_train.objectives.budget_average import averaged_if_asked

    spec = dict(spec)
    cls = objective_class(spec.pop("type"))
    return averaged_if_asked(cls(cls.Options.model_validate(spec), build), build.model, build.tokenizer.pad_token_id)
