"""Test plugin: force the MoE modules' routing so that each rank's tokens go to one expert (tests/test_moe_lora.py).

With MOE_ROUTE_BY_RANK=1 every token of rank R goes to expert R, and each rank records the keys of the
samples it routed in MOE_KEYS_DIR/rank{R}.json. With MOE_ROUTE_MAP=<json {key: expert}> (a single-process
reference run) each token goes to the expert its sample's key maps to. The gate weight stays the router's
probability of that expert, so the router still learns.
"""

import json
import os
from pathlib import Path

import torch

from llava_train.model import context
from llava_train.modules import routing

_route = routing.route
_seen: set[str] = set()


def forced_route(logits, top_k, gate, renormalise):
    probs, _, _ = _route(logits, top_k, gate, renormalise)
    ctx = context.current()
    seq = ctx.sequence_ids.reshape(-1)
    if os.environ.get("MOE_ROUTE_BY_RANK"):
        experts = torch.full_like(seq, ctx.run.rank)
        _seen.update(ctx.sample_keys)
        out = Path(os.environ["MOE_KEYS_DIR"]) / f"rank{ctx.run.rank}.json"
        out.write_text(json.dumps(sorted(_seen)))
    else:
        mapping = json.loads(Path(os.environ["MOE_ROUTE_MAP"]).read_text())
        by_sequence = torch.tensor([mapping[key] for key in ctx.sample_keys] + [0])  # index -1 (padding) -> 0
        experts = by_sequence[seq]
    chosen = experts.unsqueeze(-1).to(logits.device)
    weights = probs.gather(1, chosen) if gate == "prob" else torch.ones_like(chosen, dtype=probs.dtype)
    return probs, chosen, weights


routing.route = forced_route
