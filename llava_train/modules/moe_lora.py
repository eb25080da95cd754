"""Sparse mixture of LoRA experts on chosen linear layers of the LM (LLaVA-MoLE, Switch-style routing).

LLaVA-MoLE: a frozen base weight plus E low-rank experts per targeted projection, each token sent to
its top-k experts by a router, mitigates the conflicts between instruction data of distinct domains at
about the cost of plain LoRA. Here one router per decoder block (on the MLP's input) is shared by the
block's projections (default), or each projection has its own. The router runs in fp32; gates weight
the experts by their probability (`prob`, Switch: the router learns from the LM loss) or not at all
(`none`, LLaVA-MoLE: the router learns from the balance loss only).

Seams: the module seam (attach, own parameter group, export, FLOPs), the forward context (token roles
for the balance loss, the per-step generator for router jitter, `scratch` for the block's routing,
`adapters_disabled`), aux losses (balance, z-loss, once per forward). Experts are stacked in one
tensor per projection, so every rank runs the same modules whatever the routing: ZeRO-3 gathers the
stack with its module and nothing is data-dependent at module level (no leaf needed, see
docs/techniques/moe.md).

Invariants (tests/test_moe_lora.py): B = 0 at init => equals the base; E = 1 equals peft LoRA; sparse
dispatch equals the dense masked reference; balance loss = 1 at perfect balance, = E at collapse,
gradient only through the mean probabilities, padding never counted.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from llava_train.model import context
from llava_train.modules.base import ModuleOptions, TechniqueModule, register_module
from llava_train.modules.routing import Router, RouterOptions

DEFAULT_TARGETS = r".*\.mlp\.(gate_proj|up_proj|down_proj)"


class MoELoRAOptions(ModuleOptions, RouterOptions):
    rank: int = Field(8, ge=1)  # r of each expert
    alpha: float = 16.0  # scale alpha / r, as LoRA
    targets: str = DEFAULT_TARGETS  # regex, full-matched against module names inside the LM
    router: Literal["block", "projection"] = "block"  # one per decoder block (shared) or one per projection
    block_scope: str = "mlp"  # the submodule of a decoder layer whose input the block router reads
    dropout: float = Field(0.0, ge=0, lt=1)
    dispatch: Literal["sparse", "dense"] = "dense"  # every expert masked (two matmuls), or routed pairs only



# ----------------------------------------------------------------------------- pure tensor functions


def expert_deltas_sparse(x, a, b, chosen, weights, scale):
    """sum over chosen experts of weight * scale * B_e A_e x, computing only the routed (token, expert) pairs.
    x [N, d_in], a [E, r, d_in], b [E, d_out, r], chosen/weights [N, k] -> [N, d_out]."""
    out = x.new_zeros(x.shape[0], b.shape[1])
    for expert in range(a.shape[0]):
        tokens, slot = (chosen == expert).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = F.linear(F.linear(x[tokens], a[expert]), b[expert])
        out.index_add_(0, tokens, h * (scale * weights[tokens, slot]).unsqueeze(-1).to(h.dtype))
    return out


def expert_deltas_dense(x, a, b, chosen, weights, scale):
    """Every expert on every token as two plain matmuls of rank E*r, the unchosen experts' columns masked to
    zero: exactly the sparse result, at the cost of one LoRA of rank E*r (small next to the base weight)."""
    experts, rank = a.shape[0], a.shape[1]
    mask = torch.zeros(x.shape[0], experts, dtype=weights.dtype, device=x.device)
    mask.scatter_add_(1, chosen, weights)  # [N, E] routing weight of each expert (0 where not chosen)
    h = F.linear(x, a.reshape(experts * rank, -1))  # [N, E*r]
    h = h * (scale * mask).repeat_interleave(rank, dim=1).to(h.dtype)
    return F.linear(h, b.permute(1, 0, 2).reshape(b.shape[1], experts * rank))  # [N, d_out]


# ----------------------------------------------------------------------------- modules


class RoutedBlock(nn.Module):
    """Wraps a decoder layer's `block_scope` submodule: routes its input once for all its projections."""

    def __init__(self, base_layer: nn.Module, router: Router, key: str):
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.key = key

    def forward(self, x: torch.Tensor, *args, **kwargs):
        ctx = context.current()
        if not ctx.adapters_disabled:
            ctx.scratch[self.key] = self.router(x)[1:]  # (chosen, weights)
        return self.base_layer(x, *args, **kwargs)


class MoELoRALinear(nn.Module):
    """y = base(x) + sum over the token's chosen experts of gate * (alpha / r) * B_e A_e x."""

    def __init__(self, base_layer: nn.Linear, options: MoELoRAOptions, router: Router | None, block_key: str | None):
        super().__init__()
        self.base_layer = base_layer
        e, r = options.experts, options.rank
        d_in, d_out = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.Parameter(torch.empty(e, r, d_in))
        for expert in range(e):  # as peft/LoRA: kaiming-uniform A, zero B, so the model starts as its base
            nn.init.kaiming_uniform_(self.lora_A.data[expert], a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(e, d_out, r))
        self.scale = options.alpha / r
        self.router = router  # per-projection routing; None: read the block's routing from the context
        self.block_key = block_key
        self.dropout = nn.Dropout(options.dropout) if options.dropout else nn.Identity()  # p=0 would still copy x
        self.dispatch = options.dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        ctx = context.current()
        if ctx.adapters_disabled:
            return out
        chosen, weights = self.router(x)[1:] if self.router is not None else ctx.scratch[self.block_key]
        flat = self.dropout(x).reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        deltas = expert_deltas_dense if self.dispatch == "dense" else expert_deltas_sparse
        delta = deltas(flat, self.lora_A, self.lora_B, chosen, weights, self.scale)
        return out + delta.reshape(out.shape).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """E = 1 (the only routing is 'everything to expert 0 with weight 1'): W + scale * B A."""
        return self.base_layer.weight + self.scale * (self.lora_B[0] @ self.lora_A[0]).to(self.base_layer.weight.dtype)


# ----------------------------------------------------------------------------- attach


@register_module
class MoELoRA(TechniqueModule):
    name = "moe_lora"
    Options = MoELoRAOptions
    export = "keep"
    notes = "export merges when experts = 1, else keeps the llava_train format"

    def __init__(self, options: MoELoRAOptions):
        super().__init__(options)
        if options.experts == 1 and options.gate == "prob":
            self.export = "merge"  # softmax over one expert is 1: the module is plain LoRA

    def attach(self, model) -> dict[str, nn.Parameter]:
        opts, params = self.options, {}
        blocks: dict[str, RoutedBlock] = {}
        self.forward_flops = 0.0
        for name, linear in self._targets(model):
            router, block_key = None, None
            if opts.router == "block":
                scope = self._scope(name)
                if scope not in blocks:
                    hidden = model.lm.config.hidden_size  # the block's input is the layer's hidden state
                    shared = Router(hidden, opts, _layer_name(scope), loss_prefix=self.name)
                    blocks[scope] = RoutedBlock(model.lm.get_submodule(scope), shared, f"moe_lora/{scope}")
                    params[f"{scope}.router.weight"] = shared.weight
                    self.forward_flops += 2 * opts.experts * hidden
                block_key = blocks[scope].key
            else:
                router = Router(linear.in_features, opts, f"{_layer_name(name)}.{name.rsplit('.', 1)[-1]}", self.name)
                params[f"{name}.router.weight"] = router.weight
                self.forward_flops += 2 * opts.experts * linear.in_features
            wrapped = MoELoRALinear(linear, opts, router, block_key)
            _replace(model.lm, name, wrapped)
            params[f"{name}.lora_A"], params[f"{name}.lora_B"] = wrapped.lora_A, wrapped.lora_B
            self.forward_flops += 2 * opts.top_k * opts.rank * (linear.in_features + linear.out_features)
        for scope, block in blocks.items():  # after the projections: they live inside the block's module
            _replace(model.lm, scope, block)
        return params

    def _targets(self, model) -> list[tuple[str, nn.Linear]]:
        pattern = re.compile(self.options.targets)
        head = model.lm.get_output_embeddings()
        found = [
            (name, module)
            for name, module in model.lm.named_modules()
            if isinstance(module, nn.Linear) and module is not head and pattern.fullmatch(name)
        ]
        if not found:
            raise ValueError(f"modules: moe_lora targets {self.options.targets!r} match no Linear layer of the LM")
        return found

    def _scope(self, name: str) -> str:
        """The block a target belongs to: its name up to the last `block_scope` component."""
        parts = name.split(".")
        if self.options.block_scope not in parts[:-1]:
            raise ValueError(
                f"modules: moe_lora target {name} is outside a `{self.options.block_scope}` block; "
                "use router: projection for targets outside the block scope"
            )
        last = len(parts) - 1 - parts[:-1][::-1].index(self.options.block_scope) - 1
        return ".".join(parts[: last + 1])

    def merge(self, model) -> None:
        if self.export != "merge":
            return super().merge(model)
        for name, module in list(model.lm.named_modules()):
            if isinstance(module, RoutedBlock):
                _replace(model.lm, name, module.base_layer)
        for name, module in list(model.lm.named_modules()):
            if isinstance(module, MoELoRALinear):
                with torch.no_grad():
                    module.base_layer.weight.copy_(module.merged_weight())
                _replace(model.lm, name, module.base_layer)

    def flops_per_token(self, model) -> float:
        """Forward FLOPs per token: k experts' two low-rank matmuls per projection, plus the routers."""
        return self.forward_flops

    @classmethod
    def example_options(cls, workdir) -> dict:
        return {"experts": 2, "rank": 2, "top_k": 1}


def _layer_name(name: str) -> str:
    match = re.search(r"layers\.(\d+)", name)
    return f"layer{match.group(1)}" if match else name.replace(".", "_")


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
