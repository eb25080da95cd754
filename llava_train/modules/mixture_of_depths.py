"""Mixture-of-depths over vision tokens (p-MoD, Zhang et al. 2024): chosen decoder layers run on all
text tokens and only the top-scoring image tokens; the others skip the layer.

Per MoD layer a zero-initialised router `Linear(d, 1)` scores the layer's input; each sample keeps
its top `floor(n_image * R_l)` image tokens (or, `per_image`, the top fraction of each image). The
kept tokens and all text are gathered into a compact sequence (original order, original position
ids, the attention mask gathered from the decoder's) and the unmodified HF layer runs on it.
STRing as the released code: a kept image token gets `y = h + w * MLP(LN(h))` with
`h = x + Attn(LN(x))` (a hook on the layer's MLP scales its output), a skipped one `y = w * x`,
text is unweighted; `w = a * tanh(r) + b` (TanhNorm). The paper writes the MoD update
`y = x + w * f(x)` for kept and `y = x` for skipped tokens; see docs/techniques/mixture-of-depths.md.
Retention per layer follows progressive ratio decay (shifted cosine over L = num_hidden_layers,
MoD where R_l <= 0.85, clamped at 0.15), a fixed ratio, or every other layer.

Seams: the forward context (token roles, sequence ids, image order; `scratch` carries the STRing
weights to the MLP hook), the KV cache (each layer records on its cache which slots are real), the module
seam (own group, export `keep`, router FLOPs) and `layer_tokens` (the FLOP count of layers that run
on fewer tokens). The router runs on every token of every rank, also when nothing is selected, so
ZeRO-3 gathers the same parameters everywhere. Generation: during prefill layer l caches its
n_text + k_l tokens (a DynamicCache's layers are independent); decoding runs dense on the new
tokens against that cache, with positions from the one counter generate keeps. Layer 0 stays
dense, because transformers sizes the decode masks from the first layer's cache.

Invariants (tests/test_mixture_of_depths.py): R = 1 with a zero router equals the dense layer
exactly; nothing kept gives w * x on image tokens and the dense layer on the text-only
subsequence; compact gather equals a masked full-sequence reference; PRD table; KV-cache decoding
equals recomputation; packed equals unpacked. Conflicts: moe_upcycle (it replaces the MLP that
STRing's hook scales).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from llava_train.data.batch import TokenRole
from llava_train.model import context
from llava_train.modules.base import ModuleOptions, TechniqueModule, register_module

MASKED_IMPLEMENTATIONS = ("sdpa", "eager")  # the compact layer gets a gathered 4D mask
CACHED_SLOTS = "llava_train_mod_real_slots"  # set on a KV cache layer: [B, cached] which slots are real tokens


class MixtureOfDepthsOptions(ModuleOptions):
    schedule: Literal["prd", "fixed", "interleaved"] = "prd"  # progressive ratio decay, or `ratio` on `layers`
    threshold: float = Field(0.85, gt=0, le=1)  # prd: MoD only in layers with R_l <= threshold
    min_ratio: float = Field(0.15, ge=0, le=1)  # prd: retention never below this
    ratio: float = Field(0.5, ge=0, le=1)  # fixed / interleaved: retention in every MoD layer
    layers: list[int] | None = None  # fixed: MoD layers (default every layer but 0); interleaved: ignored
    per_image: bool = False  # top-k within each image (multi-image, frames) instead of within each sample
    weighting: Literal["tanh", "sigmoid", "none"] = "tanh"  # w = a*tanh(r)+b; sigmoid(r); 1 (router gets no LM grad)
    tanh_a: float = 0.2
    tanh_b: float = 1.0

    @model_validator(mode="after")
    def _layer_zero_dense(self):
        if self.layers is not None and 0 in self.layers:
            raise ValueError(
                "mixture_of_depths layers: layer 0 stays dense (generation sizes its masks from layer 0's "
                "KV cache); drop 0 from `layers`"
            )
        return self


# ----------------------------------------------------------------------------- pure tensor functions


def prd_schedule(num_layers: int, threshold: float = 0.85, min_ratio: float = 0.15) -> dict[int, float]:
    """p-MoD's progressive ratio decay: R_l = 0.5 cos(pi l / (L - 1)) + 0.5, MoD where R_l <= threshold,
    clamped at min_ratio. {layer: retention} for the MoD layers only (the others stay dense)."""
    if num_layers < 2:
        return {}
    ratios = {layer: 0.5 * math.cos(math.pi * layer / (num_layers - 1)) + 0.5 for layer in range(num_layers)}
    return {layer: max(r, min_ratio) for layer, r in ratios.items() if r <= threshold and layer > 0}


def retention_schedule(options: MixtureOfDepthsOptions, num_layers: int) -> dict[int, float]:
    if options.schedule == "prd":
        return prd_schedule(num_layers, options.threshold, options.min_ratio)
    if options.schedule == "interleaved":
        return {layer: options.ratio for layer in range(1, num_layers, 2)}
    layers = options.layers if options.layers is not None else range(1, num_layers)
    bad = [layer for layer in layers if not 0 < layer < num_layers]
    if bad:
        raise ValueError(f"modules: mixture_of_depths layers {bad} do not exist (the LM has {num_layers})")
    return {layer: options.ratio for layer in layers}


def token_weights(logits: torch.Tensor, options: MixtureOfDepthsOptions) -> torch.Tensor:
    if options.weighting == "tanh":
        return options.tanh_a * torch.tanh(logits) + options.tanh_b
    if options.weighting == "sigmoid":
        return torch.sigmoid(logits)
    return torch.ones_like(logits)


def select_top_k(scores: torch.Tensor, candidates: torch.Tensor, groups: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, T] scores, candidate mask and group ids -> [B, T] bool: in each (row, group) the top
    floor(n * ratio) candidates by score (ties: the earlier token)."""
    rows, length = scores.shape
    selected = torch.zeros(rows * length, dtype=torch.bool, device=scores.device)
    flat = candidates.reshape(-1).nonzero().squeeze(1)
    if flat.numel() == 0:
        return selected.view(rows, length)
    row_of = torch.arange(rows, device=scores.device)[:, None].expand(rows, length).reshape(-1)
    keys = (row_of * (int(groups.max()) + 2) + groups.reshape(-1) + 1)[flat]
    order = torch.sort(scores.detach().float().reshape(-1)[flat], descending=True, stable=True).indices
    order = order[torch.sort(keys[order], stable=True).indices]  # by group, best first within it
    _, counts = torch.unique_consecutive(keys[order], return_counts=True)
    rank = torch.arange(order.numel(), device=scores.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    budget = torch.floor(counts.double() * ratio).long()
    selected[flat[order[rank < torch.repeat_interleave(budget, counts)]]] = True
    return selected.view(rows, length)


def compact_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] keep mask -> (index [B, Tc] of the kept positions in order, valid [B, Tc]); rows with
    fewer kept tokens are filled up with (invalid) skipped positions."""
    counts = keep.sum(dim=1)
    width = int(counts.max()) if keep.numel() else 0
    index = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    return index, valid


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B|1, T, ...] -> [B, Tc, ...]: each row's entries at `index` [B, Tc]."""
    t = t.expand(index.shape[0], *t.shape[1:])
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))


def candidate_groups(image: torch.Tensor, sequence_ids: torch.Tensor, tokens_per_image: int, per_image: bool):
    """[B, T] group of each image token: its sample (sequence id) or, per image, its image's ordinal."""
    if not per_image:
        return sequence_ids.to(image.device)
    ordinal = torch.cumsum(image.reshape(-1).long(), 0) - 1  # images are laid out in row-major order
    return (ordinal // tokens_per_image).view(image.shape)


def _allowed(mask: torch.Tensor | None, query: int, keys: int, device) -> torch.Tensor:
    """The decoder's mask [B|1, 1, q, k] (bool, additive, or None = causal) as bool for the last `query`
    queries and `keys` keys."""
    if mask is None:
        return torch.ones(query, keys, dtype=torch.bool, device=device).tril(keys - query)[None, None]
    mask = mask[..., -query:, -keys:]
    return mask if mask.dtype == torch.bool else mask == 0


def compact_mask(allowed: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Gather a [B|1, 1, T, T] bool mask to the compact sequence; filler slots see only themselves."""
    rows = torch.arange(index.shape[0], device=index.device)[:, None, None]
    allowed = allowed.expand(index.shape[0], -1, -1, -1)
    gathered = allowed[rows, 0, index[:, :, None], index[:, None, :]] & valid[:, None, :]
    alone = ~gathered.any(dim=-1, keepdim=True)  # filler slots (and fully masked rows): themselves only
    return (gathered | (alone & torch.eye(index.shape[1], dtype=torch.bool, device=index.device)))[:, None]


def _as_decoder_mask(allowed: torch.Tensor, like: torch.Tensor | None, implementation: str, dtype) -> torch.Tensor:
    """Bool for SDPA (or where the decoder gave bool), additive for eager."""
    if (like is not None and like.dtype == torch.bool) or (like is None and implementation == "sdpa"):
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------- modules


class DepthRouter(nn.Module):
    """Linear(d, 1), zero-initialised (w = b at step 0, ties keep the earliest tokens), run in fp32."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), self.bias.float()).squeeze(-1)  # [B, T]


class MixtureOfDepthsLayer(nn.Module):
    """Wraps one HF decoder layer: routes, gathers the kept tokens, runs the layer, scatters back."""

    def __init__(self, base_layer: nn.Module, hidden: int, ratio: float, index: int, options, implementation: str):
        super().__init__()
        self.base_layer = base_layer
        self.router = DepthRouter(hidden)
        self.ratio = ratio
        self.index = index
        self.options = options
        self.implementation = implementation
        self.key = f"mixture_of_depths/layer{index}"
        mlp, self.cache_index = _family_parts(base_layer)
        mlp.register_forward_hook(self._string_weights)  # persistent: a checkpoint recompute must scale too

    def _string_weights(self, module, args, output):
        weights = context.current().scratch.get(f"{self.key}/weights")
        return output if weights is None else output * weights.to(output.dtype)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        ctx = context.current()
        logits = self.router(hidden_states)  # always, on every rank (ZeRO-3 gathers the same parameters)
        keep_graph = (logits.sum() * 0.0).to(hidden_states.dtype)
        if ctx.adapters_disabled:
            ctx.scratch[f"{self.key}/weights"] = None
            out = self.base_layer(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  position_embeddings=position_embeddings, **kwargs)
            return out + keep_graph
        roles = ctx.token_roles.to(hidden_states.device)
        if roles.shape != hidden_states.shape[:2]:
            raise RuntimeError(
                f"mixture_of_depths layer {self.index}: the forward context describes {tuple(roles.shape)} tokens "
                f"but the layer sees {tuple(hidden_states.shape[:2])}; run it through MultimodalLM (or "
                "context.during_generation)"
            )
        image = roles == int(TokenRole.IMAGE)
        groups = candidate_groups(image, ctx.sequence_ids, ctx.tokens_per_image, self.options.per_image)
        skip = image & ~select_top_k(logits, image, groups, self.ratio)
        index, valid = compact_index(~skip)
        weights = token_weights(logits, self.options)  # [B, T] fp32

        # The compact sequence: kept tokens in order, with their positions and rotary embeddings.
        compact = gather_rows(hidden_states, index)
        positions = gather_rows(position_ids, index) if position_ids is not None else None
        rotary = tuple(gather_rows(t, index) for t in position_embeddings) if position_embeddings is not None else None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = self._mask(attention_mask, index, valid, roles, cache, hidden_states.dtype)

        kept_image = gather_rows(image, index) & valid
        ctx.scratch[f"{self.key}/weights"] = torch.where(kept_image, gather_rows(weights, index), 1.0)[..., None]
        out = self.base_layer(compact, attention_mask=mask, position_ids=positions, position_embeddings=rotary, **kwargs)

        skipped = torch.where(skip[..., None], hidden_states * weights[..., None].to(hidden_states.dtype), hidden_states)
        rows, slots = valid.nonzero(as_tuple=True)
        result = skipped.index_put((rows, index[rows, slots]), out[rows, slots])
        self._report(ctx, image, skip)
        return result + keep_graph

    def _mask(self, attention_mask, index, valid, roles, cache, dtype):
        """The compact layer's mask: the decoder's, gathered; with a KV cache, this layer's own cached
        slots (n_text + k_l of the prompt, then every decoded token) stand before the new tokens.

        Which cached slots are real tokens (not padding or filler) is kept on the cache's layer itself,
        so it lives exactly as long as the cache, whichever loop drives the decoding."""
        length = roles.shape[1]  # the tokens of this call: the last `length` keys of the decoder's mask
        new = compact_mask(_allowed(attention_mask, length, length, index.device), index, valid)
        if cache is not None:
            if len(cache.layers) <= self.cache_index:
                raise RuntimeError(f"mixture_of_depths layer {self.index}: the KV cache has no layer {self.cache_index}")
            slot = cache.layers[self.cache_index]
            past = slot.get_seq_length()
            previous = getattr(slot, CACHED_SLOTS, None) if past else None
            if past and (previous is None or previous.shape[1] != past):
                raise RuntimeError(
                    f"mixture_of_depths layer {self.index}: the KV cache holds {past} tokens that this layer did not "
                    "cache (a cache filled without the module, or reordered); prefill with the module attached"
                )
            real = valid & (roles.gather(1, index) != int(TokenRole.PAD))
            if past:
                new = torch.cat([previous[:, None, None, :].expand(-1, 1, new.shape[2], -1), new], dim=-1)
            setattr(slot, CACHED_SLOTS, real if previous is None else torch.cat([previous, real], dim=1))
        if attention_mask is not None and attention_mask.is_floating_point():
            dtype = attention_mask.dtype
        return _as_decoder_mask(new, attention_mask, self.implementation, dtype)

    def _report(self, ctx, image, skip) -> None:
        images = int(image.sum())
        if images:
            ctx.add_metric(f"mod/retention/layer{self.index}", 1.0 - float(skip.sum()) / images)


def _family_parts(layer: nn.Module) -> tuple[nn.Module, int]:
    """The family adapter: a decoder layer's MLP (STRing scales its output) and its KV-cache slot.
    Tested: Llama, Qwen2 (both `mlp` and `self_attn.layer_idx`)."""
    mlp, attention = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
    if mlp is None or getattr(attention, "layer_idx", None) is None:
        raise ValueError(
            f"mixture_of_depths: decoder layer {type(layer).__name__} has no `mlp` and `self_attn.layer_idx`; "
            "add its family to _family_parts in llava_train/modules/mixture_of_depths.py"
        )
    return mlp, attention.layer_idx


# ----------------------------------------------------------------------------- attach


@register_module
class MixtureOfDepths(TechniqueModule):
    name = "mixture_of_depths"
    Options = MixtureOfDepthsOptions
    export = "keep"
    conflicts = ("moe_upcycle",)
    notes = "sdpa/eager attention only; conflicts with moe_upcycle (STRing scales the MLP it replaces)"

    def attach(self, model) -> dict[str, nn.Parameter]:
        layers = model.decoder.layers
        self.schedule = retention_schedule(self.options, len(layers))
        if not self.schedule:
            raise ValueError(f"modules: mixture_of_depths schedule {self.options.schedule} selects no layer of {len(layers)}")
        implementation, self.hidden = model.lm.config._attn_implementation, model.lm.config.hidden_size
        params = {}
        for index, ratio in self.schedule.items():
            wrapped = MixtureOfDepthsLayer(layers[index], self.hidden, ratio, index, self.options, implementation)
            layers[index] = wrapped
            params[f"layers.{index}.router.weight"] = wrapped.router.weight
            params[f"layers.{index}.router.bias"] = wrapped.router.bias
        return params

    def flops_per_token(self, model) -> float:
        """The routers: Linear(d, 1) on every token of every MoD layer."""
        return 2.0 * self.hidden * len(self.schedule)

    def layer_tokens(self, model, batch) -> dict[int, tuple[int, int]]:
        """Per MoD layer: the real tokens it runs on (text + kept image tokens) and its compact row length."""
        roles = batch.token_roles
        image = roles == int(TokenRole.IMAGE)
        per_image = model.connector.visual_tokens().num_tokens(batch.visual_budget)
        groups = candidate_groups(image, batch.sequence_ids, per_image, self.options.per_image)
        counts = {}
        for index, ratio in self.schedule.items():
            skip = image & ~select_top_k(torch.zeros(roles.shape), image, groups, ratio)
            real = (roles != int(TokenRole.PAD)) & ~skip
            counts[index] = (int(real.sum()), int((~skip).sum(dim=1).max()))
        return counts

    @classmethod
    def check_recipe(cls, options, recipe) -> None:
        if recipe.model.attn_implementation not in MASKED_IMPLEMENTATIONS:
            raise ValueError(
                f"mixture_of_depths runs its compact layers with a gathered attention mask: set "
                f"model.attn_implementation to sdpa or eager (got {recipe.model.attn_implementation})"
            )

    @classmethod
    def example_options(cls, workdir) -> dict:
        return {"schedule": "fixed", "ratio": 0.5}
