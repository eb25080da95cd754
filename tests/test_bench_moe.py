"""tests/bench/bench_moe.py measures one step's cost: nothing from earlier steps may stay alive."""

from __future__ import annotations

import torch

from tests.bench.bench_moe import build_variant, train_step
from tests.conftest import TINY_LM


def test_each_step_keeps_only_its_own_aux_losses():
    torch.manual_seed(0)
    lm, params = build_variant("moe_lora_dense", TINY_LM, experts=3, rank=2)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, TINY_LM["vocab_size"], (2, 16))
    contexts = [train_step(lm, optimizer, ids) for _ in range(3)]
    # One balance loss per block router per forward; a context shared across steps would hold all three steps'
    # losses with their graphs, and the bench's step memory would grow with the number of steps.
    assert [len(ctx.aux._losses["moe_lora/balance"]) for ctx in contexts] == [TINY_LM["num_hidden_layers"]] * 3
