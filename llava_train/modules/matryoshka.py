"""Matryoshka visual tokens: one model that serves any visual-token budget (MQT-LLaVA, M3).

MQT-LLaVA: M learnable latent queries cross-attend to the tower's patch features; a step trains
with the first m of them (m drawn per step), so at inference any m <= M works, and m = 16 keeps
most of the accuracy at a fraction of the LM's FLOPs. There is no self-attention between queries,
so the outputs for budget m are a prefix of those for any larger budget. M3: the `mlp` connector's
patch tokens are average-pooled to nested grids (24x24 -> 12x12 -> 6x6 -> 3x3 -> 1x1 for CLIP-L/336);
a step trains one scale drawn per step (`scale_mode: sample`) or all of them, the loss their mean
(`scale_mode: average`, one LM forward per scale: objectives/budget_average.py).

Seam: connectors (`visual_tokens()` with budgets, `forward(features, budget)`); the data pipeline
draws the step's budget from (seed, step) and sizes, packs and expands image spans for it
(data/visual_tokens.py), so a step at m = 4 packs many more samples than one at m = 64. Both export
in the llava_train format only (transformers' Llava has a fixed token count).

Invariants (tests/test_matryoshka.py): m = M equals the full connector; Q(m)[:, :m'] == Q(m');
only the first m queries get gradient; pooling at the full grid is the identity, pool-4 equals
pool-2 twice, a constant map stays constant; invalid budgets and scales refused with the valid ones.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from llava_train.data.visual_tokens import VisualTokens
from llava_train.model.connectors import MLPConnector, register_connector


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    per_rank: bool = False  # each rank draws its own budget per step (else all ranks share the step's)


class QueryOptions(_Options):
    num_queries: int = Field(256, ge=1)  # M
    budgets: list[int] | None = None  # training draws one per step; default: powers of two up to M, and M
    heads: int = Field(8, ge=1)
    keys: Literal["positions", "features"] = "positions"  # key = position embedding (MQT's code) or LN(x) + pos (Qwen-VL)


class PoolOptions(_Options):
    scales: list[int] | None = None  # tokens per image at each scale (squares tiling the grid); default: all such
    # sample: one scale per step, drawn like MQT's budget; average: every scale on every batch, the loss their
    # mean (one LM forward per scale: objectives/budget_average.py)
    scale_mode: Literal["sample", "average"] = "sample"


# ----------------------------------------------------------------------------- pure functions


def sincos_2d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embeddings [N, dim] of (row, col) positions [N, 2] (MAE-style, float positions allowed)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    parts = []
    for axis in range(2):
        angles = positions[:, axis : axis + 1].double() * freqs
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1).float()


def grid_positions(side: int, scale_to: int | None = None) -> torch.Tensor:
    """(row, col) of a side x side grid, stretched onto a scale_to x scale_to grid (interpolated positions)."""
    coords = torch.arange(side, dtype=torch.float64) * ((scale_to or side) / side)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def pool_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """[N, G*G, D] patch tokens -> [N, side*side, D] by average-pooling the G x G grid (side divides G)."""
    n, count, dim = tokens.shape
    grid = math.isqrt(count)
    if grid * grid != count or grid % side:
        raise ValueError(f"cannot pool {count} tokens to a {side}x{side} grid")
    maps = tokens.transpose(1, 2).reshape(n, dim, grid, grid)
    return F.avg_pool2d(maps, grid // side).flatten(2).transpose(1, 2)


def valid_scales(grid: int) -> list[int]:
    """Token counts s*s of the grids that tile a grid x grid map, largest first."""
    return [side * side for side in range(grid, 0, -1) if grid % side == 0]


# ----------------------------------------------------------------------------- connectors


@register_connector("matryoshka_query")
class MatryoshkaQueryConnector(nn.Module):
    """MQT: one cross-attention layer from M latent queries to the patch features, then to the LM width."""

    def __init__(self, vision_hidden: int, lm_hidden: int, num_features: int, **options):
        super().__init__()
        self.options = opts = QueryOptions(**options)
        self.grid = math.isqrt(num_features)
        if self.grid * self.grid != num_features:
            raise ValueError(f"matryoshka_query needs a square patch grid (no CLS token); got {num_features} features")
        width = vision_hidden
        self.queries = nn.Parameter(nn.init.trunc_normal_(torch.empty(opts.num_queries, width), std=0.02))
        query_side = math.ceil(math.sqrt(opts.num_queries))
        self.register_buffer("query_pos", sincos_2d(grid_positions(query_side, self.grid), width)[: opts.num_queries],
                             persistent=False)
        self.register_buffer("key_pos", sincos_2d(grid_positions(self.grid), width), persistent=False)
        self.ln_q, self.ln_k, self.ln_v = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, opts.heads, batch_first=True)
        self.proj = nn.Linear(width, lm_hidden)
        budgets = sorted(set(opts.budgets or _default_budgets(opts.num_queries)))
        if budgets[-1] > opts.num_queries or budgets[0] < 1:
            raise ValueError(f"matryoshka_query budgets {budgets} must lie in 1..num_queries={opts.num_queries}")
        self.spec = VisualTokens(full=opts.num_queries, budgets=tuple(budgets), tokens=tuple(budgets),
                                 per_rank=opts.per_rank)

    @classmethod
    def check_options(cls, options: dict, grid: int | None) -> None:
        """Recipe-load check (composition.py): the options, and budgets within num_queries."""
        opts = QueryOptions(**options)
        if opts.budgets and not all(1 <= b <= opts.num_queries for b in opts.budgets):
            raise ValueError(f"budgets {opts.budgets} must lie in 1..num_queries={opts.num_queries}")

    def visual_tokens(self) -> VisualTokens:
        return self.spec

    def forward(self, features: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """[N, G*G, Dv] -> [N, m, D_lm] with m = budget (all M queries when None)."""
        m = self.spec.num_tokens(budget) if budget is not None else self.options.num_queries
        if not 1 <= m <= self.options.num_queries:
            raise ValueError(f"matryoshka_query: {m} visual tokens asked, the connector has {self.options.num_queries}")
        q = (self.ln_q(self.queries[:m]) + self.query_pos[:m]).unsqueeze(0).expand(features.shape[0], -1, -1)
        v = self.ln_v(features)
        k = self.key_pos.expand_as(v) if self.options.keys == "positions" else self.ln_k(features) + self.key_pos
        out, _ = self.attn(q, k.to(q.dtype), v, need_weights=False)
        return self.proj(out)


@register_connector("matryoshka_pool")
class MatryoshkaPoolConnector(MLPConnector):
    """M3: the LLaVA-1.5 `mlp` connector, then the patch grid average-pooled to the step's scale (`scale_mode: average`: objectives/budget_average.py)."""

    def __init__(self, vision_hidden: int, lm_hidden: int, num_features: int, bias: bool = True, **options):
        super().__init__(vision_hidden, lm_hidden, num_features, bias=bias)
        opts = PoolOptions(**options)
        grid = math.isqrt(num_features)
        if grid * grid != num_features:
            raise ValueError(f"matryoshka_pool needs a square patch grid (no CLS token); got {num_features} features")
        valid = valid_scales(grid)
        scales = sorted(set(opts.scales or valid), reverse=True)
        bad = [s for s in scales if s not in valid]
        if bad:
            raise ValueError(f"matryoshka_pool scales {bad} do not tile the {grid}x{grid} patch grid; valid: {valid}")
        self.spec = VisualTokens(full=num_features, budgets=tuple(scales), tokens=tuple(scales), per_rank=opts.per_rank,
                                 average=opts.scale_mode == "average")

    @classmethod
    def check_options(cls, options: dict, grid: int | None) -> None:
        """Recipe-load check (composition.py): scales must tile the tower's patch grid, when it is known."""
        opts = PoolOptions(**options)
        if grid is not None and opts.scales and any(s not in valid_scales(grid) for s in opts.scales):
            bad = [s for s in opts.scales if s not in valid_scales(grid)]
            raise ValueError(f"scales {bad} do not tile the {grid}x{grid} patch grid; valid: {valid_scales(grid)}")

    def visual_tokens(self) -> VisualTokens:
        return self.spec

    def forward(self, features: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        tokens = self.spec.num_tokens(budget)
        return pool_grid(self.linear_2(self.act(self.linear_1(features))), math.isqrt(tokens))


def _default_budgets(m: int) -> list[int]:
    return sorted({2**i for i in range(int(math.log2(m)) + 1)} | {m})
