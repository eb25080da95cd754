"""What an attachable technique module declares, and the registry that finds it by name.

A technique (mixture of LoRA experts, mixture-of-depths, ...) is one class here: a pydantic
`Options` model (its recipe keys), `attach(model)` (wrap or replace submodules in place, return
its own new parameters) and class-level declarations the framework acts on without knowing the
technique: export policy, ZeRO-3 leaf classes, FLOPs per token, conflicts and requirements, and
cross-section recipe rules. The trainer and `MultimodalLM` never import a technique.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from llava_train.registry import Registry

if TYPE_CHECKING:
    from llava_train.model.mllm import MultimodalLM
    from llava_train.recipe import Recipe

# merge: folded into plain weights; convert: the LM becomes a transformers class that holds the module (e.g.
# Qwen2-MoE), where it can; keep: llava_train format only; refuse: no export
ExportPolicy = Literal["merge", "convert", "keep", "refuse"]


class ModuleOptions(BaseModel):
    """Options every module has; a technique subclasses this with its own documented fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lr: float | None = Field(None, ge=0)  # None: stage.lr.modules, else train.lr
    weight_decay: float | None = Field(None, ge=0)  # None: train.weight_decay (never on norms, biases, 1-D)
    trainable: bool = True  # False: attach frozen (e.g. a module carried over from init_from)


class TechniqueModule(ABC):
    """One attached technique. Subclasses set `name` and `Options` and implement `attach`."""

    name: ClassVar[str]
    Options: ClassVar[type[ModuleOptions]] = ModuleOptions
    export: ClassVar[ExportPolicy] = "keep"
    conflicts: ClassVar[tuple[str, ...]] = ()  # module/objective names it cannot run with
    requires: ClassVar[tuple[str, ...]] = ()  # module/objective names it needs in the same recipe
    zero3_leaf_classes: ClassVar[tuple[type[nn.Module], ...]] = ()  # gathered whole under ZeRO-3
    notes: ClassVar[str] = ""  # one line for the support matrix (e.g. when the export policy depends on options)

    def __init__(self, options: ModuleOptions):
        self.options = options
        self.own_parameters: dict[str, nn.Parameter] = {}  # set by `attach_to`
        self.frozen_parameters: list[nn.Parameter] = []  # what the module keeps frozen whatever the stage says

    def attach_to(self, model: "MultimodalLM") -> None:
        self.own_parameters = self.attach(model)
        if not self.own_parameters:
            raise ValueError(f"module `{self.name}` attached no parameters; check its target options")
        model.attachments.append(self)

    @abstractmethod
    def attach(self, model: "MultimodalLM") -> dict[str, nn.Parameter]:
        """Wrap or replace submodules of `model` in place; return the new parameters by name.
        Raise ValueError naming the option when no target matches."""

    def merge(self, model: "MultimodalLM") -> None:
        """Fold the module into plain weights (export policy `merge`)."""
        raise ValueError(f"module `{self.name}` cannot be merged into plain weights (export policy {self.export})")

    def convert_lm(self, lm: nn.Module) -> nn.Module:
        """Export policy `convert`: the LM holding this module as an equal model of a transformers class
        that represents it. Raise ValueError saying what that class cannot represent: export then keeps
        the llava_train format and logs the reason."""
        raise ValueError(f"module `{self.name}` has no transformers class to convert to (export policy {self.export})")

    def flops_per_token(self, model: "MultimodalLM") -> float:
        """Forward FLOPs per LM token on the module's own weights, outside plain Linear layers (which the
        MFU count already walks); counted x3 when the module trains, x2 when frozen."""
        return 0.0

    def frozen_flops_per_token(self, model: "MultimodalLM") -> float:
        """Forward FLOPs per LM token the module adds on weights that stay frozen (e.g. a shared copy
        run once per chosen expert); counted x2 (forward and input gradient)."""
        return 0.0

    def layer_tokens(self, model: "MultimodalLM", batch) -> dict[int, tuple[int, int]]:
        """Decoder layers the module runs on fewer tokens than `batch` holds: {layer index: (real tokens,
        row length)} (the FLOP count then counts those layers over what they ran). Default: none."""
        return {}

    @classmethod
    def example_options(cls, workdir) -> dict:
        """Options that run on the tests' tiny model (the composition test runs every allowed pair
        with them); `workdir` is a scratch folder for anything they need (e.g. a teacher checkpoint)."""
        return {}

    @classmethod
    def check_recipe(cls, options: ModuleOptions, recipe: "Recipe") -> None:
        """Cross-section rules (stage, packing, ZeRO stage, ...); raise ValueError with the fix."""

    def spec(self) -> dict:
        """What a checkpoint records to rebuild the module: `{type, **options}`."""
        return {"type": self.name, **self.options.model_dump(mode="json")}


MODULES = Registry("module")
register_module = MODULES.register
module_class = MODULES.lookup


def build_module(spec: dict) -> TechniqueModule:
    """`{type: NAME, **options}` -> an unattached module with validated options."""
    spec = dict(spec)
    cls = module_class(spec.pop("type"))
    return cls(cls.Options.model_validate(spec))
