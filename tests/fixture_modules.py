"""Test-only technique modules, loaded by recipes through `plugins: [tests.fixture_modules]`.

`test_gate` puts a trainable gate on the MLP of chosen decoder layers (inside the layer, so a
gradient-checkpoint recompute runs it again): image tokens' MLP output is scaled by
`1 + tanh(gate)`, plus noise drawn from the per-step generator. It reads token roles from the
forward context, reports an aux loss of known value `weight * (1 + |gate|^2)` per layer, honours
`adapters_disabled`, and declares export `keep`. `test_gate_refuse` is the same with export
`refuse` and a declared conflict with `test_gate`.
"""

from __future__ import annotations

from collections import Counter

import torch
from pydantic import Field
from torch import nn

from llava_train.model import context
from llava_train.modules import ModuleOptions, TechniqueModule, register_module

CALLS: Counter = Counter()  # "forward" / "recompute": lets tests see that checkpointing recomputed


class GateOptions(ModuleOptions):
    layers: list[int] = Field(default_factory=lambda: [0])  # decoder layer indices
    aux_weight: float = 0.1  # weight of the per-layer aux loss
    noise: float = 0.0  # std of the per-step noise on the gate (drawn from the forward context)
    reduce: str = "mean"  # how the per-layer aux terms combine


class GatedMLP(nn.Module):
    def __init__(self, base_layer: nn.Module, hidden_size: int, name: str, options: GateOptions):
        super().__init__()
        self.base_layer = base_layer
        self.gate = nn.Parameter(torch.zeros(hidden_size))  # zero: the model equals its base
        self.name = name
        self.options = options

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(hidden_states)
        ctx = context.current()
        CALLS["recompute" if ctx.recomputing else "forward"] += 1
        if ctx.adapters_disabled:
            return out
        gate = self.gate
        if self.options.noise:
            noise = torch.randn(gate.shape, generator=ctx.generator(self.name)) * self.options.noise
            gate = gate + noise.to(gate)
        image = ctx.image_mask.unsqueeze(-1).to(out.dtype)  # [B, T, 1]
        ctx.add_loss("test_gate", self.options.aux_weight * (1 + self.gate.float().square().sum()), self.options.reduce)
        ctx.add_metric(f"test_gate/{self.name}/image_tokens", image.sum())
        return out * (1 + image * torch.tanh(gate))


@register_module
class TestGate(TechniqueModule):
    name = "test_gate"
    Options = GateOptions
    export = "keep"

    def attach(self, model) -> dict[str, nn.Parameter]:
        layers = model.decoder.layers
        params = {}
        for index in self.options.layers:
            if not 0 <= index < len(layers):
                raise ValueError(f"modules: test_gate layer {index} does not exist (the LM has {len(layers)})")
            wrapped = GatedMLP(layers[index].mlp, model.lm.config.hidden_size, f"layer{index}", self.options)
            layers[index].mlp = wrapped
            params[f"layers.{index}.gate"] = wrapped.gate
        return params

    @classmethod
    def check_recipe(cls, options, recipe) -> None:
        if options.reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be mean or sum, got {options.reduce!r}")


@register_module
class TestGateRefuse(TestGate):
    name = "test_gate_refuse"
    export = "refuse"
    conflicts = ("test_gate",)


# ----------------------------------------------------------------------------- a test objective with a second model


from llava_train.model.io import load_any  # noqa: E402
from llava_train.objectives import Objective, ObjectiveOptions, ObjectiveOutput, register_objective  # noqa: E402
from llava_train.objectives.lm import cross_entropy_sum, supervised_positions  # noqa: E402


class AnchorOptions(ObjectiveOptions):
    reference: str | None = None  # a checkpoint or exported Llava folder; None: the policy with adapters disabled
    weight: float = 1.0


@register_objective
class TestAnchor(Objective):
    """CE plus `weight * |h - h_ref|^2 / D` at supervised positions: a frozen reference pulls the policy back.
    Also reports which fraction of the reference's weights this rank holds (ZeRO-3 partitions it)."""

    name = "test_anchor"
    Options = AnchorOptions

    def __init__(self, options, build):
        super().__init__(options, build)
        if options.reference is not None:
            model, _ = load_any(options.reference, build.zero3_config)
            self.add_frozen_model("reference", model)

    def forward(self, model, batch) -> ObjectiveOutput:
        out = model(batch)
        with torch.no_grad():
            if "reference" in self.frozen:
                reference = self.frozen["reference"](batch).hidden_states
            else:
                with model.adapters_disabled():
                    reference = model(batch).hidden_states
        mask, _ = supervised_positions(batch.labels)
        diff = (out.hidden_states[:, :-1][mask] - reference[:, :-1][mask]).float()
        anchor = self.options.weight * diff.square().sum() / diff.shape[-1]
        ce = cross_entropy_sum(out.hidden_states, model.output_embeddings, batch.labels, self.loss_config)
        metrics = {"anchor_sum": float(anchor.detach())}
        if "reference" in self.frozen:
            params = list(self.frozen["reference"].parameters())
            local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
            metrics["reference_local_fraction"] = local / sum(getattr(p, "ds_numel", p.numel()) for p in params)
        return ObjectiveOutput(ce.loss + anchor, ce.num_tokens, out.aux_losses, metrics)
