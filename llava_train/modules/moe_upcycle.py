"""MoE-tuning (MoE-LLaVA): upcycle trained FFNs into a sparse mixture of experts.

Chosen decoder layers' MLPs (every other layer by default) become E experts initialised as copies
of the trained MLP, with a top-2 router whose chosen probabilities are renormalised, so at step 0
the layer computes exactly what the dense MLP did. Each expert takes at most `capacity_factor x
tokens x k / E` tokens per forward (GShard: first slots first, then by position); the rest of its
assignments are dropped (the residual stream carries those tokens on). With `expert_lora` the
experts share one frozen copy of the MLP and differ by low-rank deltas, as LoRA experts.

Seams: the module seam (attach after the dense SFT checkpoint loads; own parameter group; export
to Qwen2-MoE where the LM is Llama/Qwen2-shaped), the forward context (roles: padding is never
routed nor counted), aux losses through the shared router (routing.py). Experts are stacked
tensors in transformers' Qwen2-MoE layout (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`), so
every rank runs the same module whatever the routing (nothing data-dependent at module level
under ZeRO-3) and export is a copy.

Invariants (tests/test_moe_upcycle.py): k = 1 and k = 2 with enough capacity equal the dense layer;
dropped counts follow the capacity formula; balance loss as moe_lora's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from llava_train.data.batch import TokenRole
from llava_train.model import context
from llava_train.modules.base import ModuleOptions, TechniqueModule, register_module
from llava_train.modules.routing import Router, RouterOptions
from llava_train.model.zero3 import gathered

SWIGLU = ("gate_proj", "up_proj", "down_proj")


class MoEUpcycleOptions(ModuleOptions, RouterOptions):
    top_k: int = Field(2, ge=1)
    renormalise: bool = True  # MoE-LLaVA: the chosen gates sum to 1, so identical experts give the dense MLP
    layers: list[int] | str = "every_other"  # `every_other` (1, 3, 5, ... as MoE-LLaVA), `all`, or indices
    capacity_factor: float | None = Field(1.5, gt=0)  # training; None = no dropping
    eval_capacity_factor: float | None = Field(None, gt=0)  # evaluation and generation; None = no dropping
    expert_lora: int | None = Field(None, ge=1)  # rank: experts = one frozen MLP + LoRA deltas
    lora_alpha: float = 16.0
    mlp_name: str = "mlp"  # the decoder layer's MLP attribute

    @field_validator("layers")
    @classmethod
    def _layers(cls, value):
        if isinstance(value, str) and value not in ("every_other", "all"):
            raise ValueError("layers must be `every_other`, `all` or a list of layer indices")
        return value


# ----------------------------------------------------------------------------- pure functions


def capacity_keep(chosen: torch.Tensor, experts: int, capacity: int | None) -> torch.Tensor:
    """[N, k] expert choices -> [N, k] bool: which assignments fit their expert's capacity.

    Priority as GShard: all first choices before any second choice, and by token position within a
    choice, so a token's top expert is the last assignment to be dropped."""
    if capacity is None:
        return torch.ones_like(chosen, dtype=torch.bool)
    order = chosen.t().reshape(-1)  # slot-major: [slot 0 of every token, slot 1 of every token, ...]
    one_hot = F.one_hot(order, experts)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # index of each assignment in its expert's queue
    return (position < capacity).reshape(chosen.shape[1], chosen.shape[0]).t()


def expert_capacity(factor: float | None, tokens: int, top_k: int, experts: int) -> int | None:
    return None if factor is None else max(1, math.ceil(factor * tokens * top_k / experts))


# ----------------------------------------------------------------------------- the block


class UpcycledMoE(nn.Module):
    """Replaces one SwiGLU MLP: routed experts in Qwen2-MoE's stacked layout, or LoRA experts over it."""

    def __init__(self, mlp: nn.Module, hidden: int, options: MoEUpcycleOptions, name: str):
        super().__init__()
        self.options, self.name = options, name
        self.act_fn = mlp.act_fn
        self.router = Router(hidden, options, name, loss_prefix="moe_upcycle")
        e = options.experts
        with gathered([getattr(mlp, p).weight for p in SWIGLU]):
            gate, up, down = (getattr(mlp, p).weight.detach().clone() for p in SWIGLU)
        if options.expert_lora is None:
            self.gate_up_proj = nn.Parameter(torch.cat([gate, up]).unsqueeze(0).repeat(e, 1, 1))
            self.down_proj = nn.Parameter(down.unsqueeze(0).repeat(e, 1, 1))
            self.shared = None
        else:  # LoRA experts: one frozen copy, E low-rank deltas per projection (B = 0: all equal the MLP)
            self.shared = mlp.requires_grad_(False)
            r = options.expert_lora
            self.lora_A = nn.ParameterDict({p: nn.Parameter(torch.empty(e, r, getattr(mlp, p).in_features)) for p in SWIGLU})
            self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(e, getattr(mlp, p).out_features, r)) for p in SWIGLU})
            for a in self.lora_A.values():
                for expert in range(e):
                    nn.init.kaiming_uniform_(a.data[expert], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = context.current()
        flat = x.reshape(-1, x.shape[-1])
        routed = _routed_tokens(ctx, x.shape[:-1], flat.device)  # padding is never routed
        _, chosen, weights = self.router(flat[routed])
        factor = self.options.capacity_factor if self.training else self.options.eval_capacity_factor
        capacity = expert_capacity(factor, chosen.shape[0], self.options.top_k, self.options.experts)
        keep = capacity_keep(chosen, self.options.experts, capacity)
        ctx.add_metric(f"moe/dropped/{self.name}", 1 - keep.float().mean() if keep.numel() else 0.0)
        out = torch.zeros_like(flat)
        out[routed] = self._experts(flat[routed], chosen, weights * keep)
        return out.reshape(x.shape)

    def _experts(self, x, chosen, weights):
        out = torch.zeros_like(x)
        for expert in range(self.options.experts):  # every expert runs (maybe on no token): same ops on every rank
            tokens, slot = (chosen == expert).nonzero(as_tuple=True)
            h = self._expert(x[tokens], expert)
            out.index_add_(0, tokens, (h * weights[tokens, slot].unsqueeze(-1).to(h.dtype)).to(out.dtype))
        return out

    def _expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        if self.shared is None:
            gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
            return F.linear(self.act_fn(gate) * up, self.down_proj[expert])
        scale = self.options.lora_alpha / self.options.expert_lora
        project = lambda p, h: getattr(self.shared, p)(h) + scale * F.linear(  # noqa: E731
            F.linear(h, self.lora_A[p][expert].to(h.dtype)), self.lora_B[p][expert].to(h.dtype))
        return project("down_proj", self.act_fn(project("gate_proj", x)) * project("up_proj", x))


def _routed_tokens(ctx, shape: torch.Size, device) -> torch.Tensor:
    if ctx.token_roles.shape != shape:
        return torch.ones(shape.numel(), dtype=torch.bool, device=device)
    return ctx.token_roles.reshape(-1).to(device) != int(TokenRole.PAD)


# ----------------------------------------------------------------------------- attach


@register_module
class MoEUpcycle(TechniqueModule):
    name = "moe_upcycle"
    Options = MoEUpcycleOptions
    export = "convert"
    conflicts = ("moe_lora",)  # both would claim the same MLPs
    notes = "SwiGLU MLPs (Llama, Qwen2, Mistral); exports as Qwen2-MoE from Llama/Qwen2 (qwen2_moe_export.py), else the llava_train format"

    def attach(self, model) -> dict[str, nn.Parameter]:
        layers = model.decoder.layers
        chosen = self._layer_indices(len(layers))
        params: dict[str, nn.Parameter] = {}
        hidden = model.lm.config.hidden_size
        self.forward_flops = self.frozen_forward_flops = 0.0
        for index in chosen:
            mlp = getattr(layers[index], self.options.mlp_name)
            missing = [p for p in (*SWIGLU, "act_fn") if not hasattr(mlp, p)]
            if missing:
                raise ValueError(
                    f"modules: moe_upcycle needs a SwiGLU MLP (gate_proj, up_proj, down_proj, act_fn); layer {index}'s "
                    f"`{self.options.mlp_name}` lacks {missing}"
                )
            block = UpcycledMoE(mlp, hidden, self.options, f"layer{index}")
            setattr(layers[index], self.options.mlp_name, block)
            params.update({f"layers.{index}.{n}": p for n, p in block.named_parameters() if not n.startswith("shared.")})
            if block.shared is not None:
                self.frozen_parameters += list(block.shared.parameters())  # the experts' common frozen copy
            inter = mlp.gate_proj.out_features
            lora = 0 if self.options.expert_lora is None else 2 * self.options.expert_lora * (3 * hidden + 3 * inter)
            # Stacked experts are no Linear layers (the matmul walk cannot see them): k MLPs per token. LoRA
            # experts keep the shared, frozen MLP's Linears (counted once by the walk): k - 1 more runs of it.
            mlp = 6 * hidden * inter
            if self.options.expert_lora is None:
                self.forward_flops += self.options.top_k * mlp
            else:
                self.forward_flops += self.options.top_k * lora
                self.frozen_forward_flops += (self.options.top_k - 1) * mlp
            self.forward_flops += 2 * self.options.experts * hidden  # the router
        return params

    def _layer_indices(self, count: int) -> list[int]:
        layers = self.options.layers
        if layers == "all":
            return list(range(count))
        if layers == "every_other":
            return list(range(1, count, 2))
        bad = [i for i in layers if not 0 <= i < count]
        if bad:
            raise ValueError(f"modules: moe_upcycle layers {bad} do not exist (the LM has {count} layers)")
        return sorted(set(layers))

    def convert_lm(self, lm: nn.Module) -> nn.Module:
        from llava_train.modules.qwen2_moe_export import to_qwen2_moe

        layers = lm.get_decoder().layers
        blocks = {i: getattr(layer, self.options.mlp_name, None) for i, layer in enumerate(layers)}
        return to_qwen2_moe(lm, self.options, {i: b for i, b in blocks.items() if isinstance(b, UpcycledMoE)})

    def flops_per_token(self, model) -> float:
        return self.forward_flops

    def frozen_flops_per_token(self, model) -> float:
        return self.frozen_forward_flops

    @classmethod
    def example_options(cls, workdir) -> dict:
        return {"experts": 2, "top_k": 2, "layers": [1]}
