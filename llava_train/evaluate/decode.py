"""Greedy decoding with the LM's KV cache: batched (left padding), and in lockstep across ranks.

HF `generate` stops when its own rows are done, so under ZeRO-3 a rank that finishes early
would leave its peers waiting in a parameter gather. This loop lets the caller decide when to
stop: `keep_going(local)` returns whether any rank still generates (an all-reduce in training,
`lambda local: local` in one process). A rank whose rows are all done feeds pad tokens, whose
results are dropped, until every rank is done; every rank thus runs the same number of
forwards. Each forward runs under a forward context, so attached modules see token roles as
in training (the prompt's text and image tokens; one text token per row per step).

With one process, the tokens equal HF `generate(inputs_embeds=..., do_sample=False)` and a
batch's answers equal its rows answered one by one (tests/test_evaluate.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from llava_train.data.batch import Batch, TokenRole
from llava_train.model import context
from llava_train.model.context import ForwardContext
from llava_train.model.mllm import MultimodalLM


def left_pad(batch: Batch) -> Batch:
    """A right-padded, unpacked batch with every row shifted right, so all prompts end in the
    last column (where the next token is read). Positions move with their tokens."""
    if batch.packed:
        raise ValueError("generation needs one prompt per row; got a packed batch")
    shifts = batch.input_ids.shape[1] - batch.attention_mask.sum(dim=1)
    fields = ("input_ids", "labels", "attention_mask", "token_roles", "position_ids", "sequence_ids")
    rolled = {name: torch.stack([row.roll(int(s)) for row, s in zip(getattr(batch, name), shifts)]) for name in fields}
    return Batch(**{**vars(batch), **rolled})


@torch.no_grad()
def greedy_decode(
    model: MultimodalLM,
    batch: Batch,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    keep_going: Callable[[bool], bool] = lambda local: local,
) -> list[list[int]]:
    """New token ids per row of a right-padded prompt batch (collate's output), stop token excluded."""
    batch = left_pad(batch)
    mask = batch.attention_mask
    params = _forward_parameters(model.lm)
    logits_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # only the last position's logits
    cache_key = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
    with context.activate(model.forward_context(batch)):
        out = model.lm(
            inputs_embeds=model.embed(batch), attention_mask=mask, position_ids=batch.position_ids,
            use_cache=True, **logits_kwargs,
        )
    position = batch.position_ids[:, -1:] + 1
    rows = mask.shape[0]
    done = torch.zeros(rows, dtype=torch.bool, device=mask.device)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=mask.device)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(dim=-1)
        finished = torch.isin(next_ids, stops)
        for row in torch.nonzero(~done & ~finished).flatten().tolist():
            tokens[row].append(int(next_ids[row]))
        done |= finished
        next_ids = next_ids.masked_fill(done, pad_id)
        if step + 1 == max_new_tokens or not keep_going(not bool(done.all())):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        with context.activate(_step_context(model, position)):
            out = model.lm(
                input_ids=next_ids[:, None], attention_mask=mask, position_ids=position,
                use_cache=True, **{cache_key: getattr(out, cache_key)}, **logits_kwargs,
            )
        position = position + 1
    return tokens


def _step_context(model: MultimodalLM, position: torch.Tensor) -> ForwardContext:
    """One new text token per row: what attached modules read during a decoding step."""
    rows = position.shape[0]
    return ForwardContext(
        token_roles=torch.full((rows, 1), int(TokenRole.TEXT), dtype=torch.int8, device=position.device),
        sequence_ids=torch.arange(rows, device=position.device)[:, None],
        position_ids=position,
        image_sample_index=torch.zeros(0, dtype=torch.long, device=position.device),
        tokens_per_image=model.tokens_per_image,
        packed=False,
        run=model.run_state,
        training=False,
        adapters_disabled=model._adapters_disabled,
    )


def _forward_parameters(lm: torch.nn.Module) -> set[str]:
    """The causal LM's forward arguments (under a peft wrapper, its base model's)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return set(inspect.signature(base.forward).parameters)
