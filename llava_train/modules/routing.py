"""Token routing shared by the mixture-of-experts modules (moe_lora, moe_upcycle).

A bias-free router computed in fp32 (also under bf16 autocast, so decisions do not depend on the
compute dtype), top-k selection, Switch/GShard balance loss and ST-MoE z-loss reported once per
forward through the forward context, and per-layer load and entropy metrics
(`moe/load/<layer>/expert<E>`, `moe/entropy/<layer>`; the report page draws them).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import nn

from llava_train.data.batch import TokenRole
from llava_train.model import context


class RouterOptions(BaseModel):
    experts: int = Field(4, ge=1)  # E
    top_k: int = Field(1, ge=1)
    gate: Literal["prob", "none"] = "prob"  # weight experts by router probability (Switch) or not (LLaVA-MoLE)
    renormalise: bool = False  # the chosen probabilities sum to 1 (at k = 1 the gate is then 1: no LM-loss gradient)
    balance_coef: float = Field(0.01, ge=0)  # Switch/GShard load-balancing loss weight
    balance_tokens: Literal["all", "text"] = "all"  # tokens the balance loss counts (padding never)
    balance_reduce: Literal["mean", "sum"] = "mean"  # over routers: mean, or sum as MoE-LLaVA
    z_loss_coef: float = Field(0.0, ge=0)  # router z-loss (ST-MoE)
    jitter: float = Field(0.0, ge=0)  # multiplicative router-input noise in training (Switch), per-step generator

    @model_validator(mode="after")
    def _k_fits(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        return self


def route(logits: torch.Tensor, top_k: int, gate: str, renormalise: bool):
    """fp32 logits [N, E] -> (probs [N, E], chosen experts [N, k], gate weights [N, k])."""
    probs = logits.float().softmax(dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    if gate == "none":
        return probs, top_i, torch.ones_like(top_p)
    if renormalise:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    return probs, top_i, top_p


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Switch/GShard: E * sum_e f_e * P_e over the counted tokens. f_e (fraction of routed slots sent to
    e) carries no gradient; P_e (mean probability) does. 1 at perfect balance, E at total collapse."""
    experts = probs.shape[-1]
    probs, chosen = probs[counted], chosen[counted]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0  # keeps the graph (and the same ops on every rank)
    dispatch = F.one_hot(chosen, experts).float().sum(dim=1)  # [n, E] slots per expert
    fraction = dispatch.mean(dim=0) / chosen.shape[1]
    return experts * (fraction.detach() * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    z = torch.logsumexp(logits.float()[counted], dim=-1)
    return z.square().mean() if z.numel() else logits.sum() * 0.0


def counted_tokens(ctx, shape: torch.Size, which: str, device) -> torch.Tensor:
    """[N] mask of the tokens the balance loss counts: never padding; only text when `which` is text."""
    if ctx.token_roles.shape != shape:  # roles unknown for these tokens (e.g. compacted by another module)
        return torch.ones(shape.numel(), dtype=torch.bool, device=device)
    roles = ctx.token_roles.reshape(-1).to(device)
    counted = roles != int(TokenRole.PAD)
    return counted & (roles == int(TokenRole.TEXT)) if which == "text" else counted


class Router(nn.Module):
    """A bias-free fp32 router; routes `x` and reports its losses and metrics once per forward."""

    def __init__(self, hidden: int, options: RouterOptions, name: str, loss_prefix: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(options.experts, hidden))
        nn.init.normal_(self.weight, std=hidden**-0.5)
        self.options = options
        self.name = name  # e.g. layer3: names the metrics
        self.loss_prefix = loss_prefix  # e.g. moe_lora: names the aux losses

    def forward(self, x: torch.Tensor):
        """x [..., d] -> (probs [N, E], chosen [N, k], weights [N, k]) over the N = prod(...) tokens."""
        ctx = context.current()
        flat = x.reshape(-1, x.shape[-1]).float()
        if self.training and self.options.jitter:
            gen = ctx.generator(f"{self.loss_prefix}/{self.name}")
            noise = torch.empty(flat.shape).uniform_(1 - self.options.jitter, 1 + self.options.jitter, generator=gen)
            flat = flat * noise.to(flat.device)
        with torch.autocast(flat.device.type, enabled=False):
            logits = F.linear(flat, self.weight.float())
        opts = self.options
        probs, chosen, weights = route(logits, opts.top_k, opts.gate, opts.renormalise)
        counted = counted_tokens(ctx, x.shape[:-1], opts.balance_tokens, flat.device)
        if opts.balance_coef:
            loss = opts.balance_coef * balance_loss(probs, chosen, counted)
            ctx.add_loss(f"{self.loss_prefix}/balance", loss, opts.balance_reduce)
        if opts.z_loss_coef:
            ctx.add_loss(f"{self.loss_prefix}/z_loss", opts.z_loss_coef * router_z_loss(logits, counted), opts.balance_reduce)
        self._metrics(ctx, probs, chosen, counted)
        return probs, chosen, weights

    def _metrics(self, ctx, probs, chosen, counted) -> None:
        with torch.no_grad():
            load = F.one_hot(chosen[counted], self.options.experts).float().sum(dim=(0, 1))
            load = load / load.sum().clamp(min=1)
            kept = probs[counted]
            entropy = -(kept * kept.clamp(min=1e-9).log()).sum(-1).mean() if kept.numel() else None
        for expert in range(self.options.experts):
            ctx.add_metric(f"moe/load/{self.name}/expert{expert}", load[expert])
        if entropy is not None:
            ctx.add_metric(f"moe/entropy/{self.name}", entropy)
