"""GKD's on-policy option: some steps distil on a completion the student sampled itself.

Whether a micro-batch is on-policy is drawn from the forward context's generator keyed by (seed,
step, micro-step, name) and shared by all ranks, so every rank takes the same branch and a resumed
run repeats it; the tokens are sampled from a per-rank generator. The prompt of a sample is
everything before its first supervised token (its first answer). Decoding runs in lockstep across
ranks (evaluate/decode.py): a rank whose rows are done feeds pads until every rank is done, so
ZeRO-3's parameter gathers never wait on a rank that stopped early.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from llava_train.data.batch import IGNORE_INDEX, Batch, Example
from llava_train.data.collate import collate_rows
from llava_train.data.templates import get_template
from llava_train.evaluate.decode import greedy_decode


def stop_ids(tokenizer, template: str) -> list[int]:
    return get_template(template, tokenizer).stop_token_ids


def drawn(model, batch: Batch, probability: float) -> bool:
    """Whether this training micro-batch is on-policy (never during evaluation)."""
    if probability <= 0 or not model.training:
        return False
    generator = model.forward_context(batch).generator("kd/on_policy", per_rank=False)
    return bool(torch.rand((), generator=generator) < probability)


def sample_batch(model, batch: Batch, objective, options) -> Batch:
    """The batch's prompts, each followed by the student's sampled completion (supervised)."""
    if batch.packed:
        raise ValueError("kd on_policy needs one sample per row; set data.packing=false")
    prompts = _prompts(batch)
    prompt_batch = collate_rows([[p] for p in prompts], objective.pad_id, model.image_token_id,
                                visual_budget=batch.visual_budget).to(batch.input_ids.device)
    if batch.pixel_values is not None:
        prompt_batch.pixel_values, prompt_batch.image_sample_index = batch.pixel_values, batch.image_sample_index
    generator = model.forward_context(batch).generator("kd/sample", device=batch.input_ids.device)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, : options.vocab_slice]  # only tokens the teacher has (a declared shared slice)
        probs = torch.softmax(logits.float() / options.sample_temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    was_training = model.training
    model.eval()  # HF turns the KV cache off under gradient checkpointing in training mode
    try:
        with torch.no_grad():
            completions = greedy_decode(model, prompt_batch, options.max_new_tokens, objective.stop_ids,
                                        objective.pad_id, keep_going=_any_rank(batch.input_ids.device), choose=choose)
    finally:
        model.train(was_training)
    rows = [[Example(p.input_ids + c, [IGNORE_INDEX] * len(p.input_ids) + c, key=p.key)] for p, c in zip(prompts, completions)]
    sampled = collate_rows(rows, objective.pad_id, model.image_token_id, visual_budget=batch.visual_budget)
    sampled = sampled.to(batch.input_ids.device)
    sampled.pixel_values, sampled.image_sample_index = batch.pixel_values, batch.image_sample_index
    return sampled


def _prompts(batch: Batch) -> list[Example]:
    """Per row: the tokens before its first supervised one (images stay expanded)."""
    prompts = []
    for row in range(batch.input_ids.shape[0]):
        supervised = torch.nonzero(batch.labels[row] != IGNORE_INDEX).flatten()
        end = int(supervised[0]) if supervised.numel() else int(batch.attention_mask[row].sum())
        ids = batch.input_ids[row, :end].tolist()
        prompts.append(Example(ids, [IGNORE_INDEX] * len(ids), key=batch.keys[row] if batch.keys else ""))
    return prompts


def _any_rank(device):
    """keep_going for lockstep decoding: whether any rank still has rows generating."""

    def keep_going(local: bool) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return local
        flag = torch.tensor([float(local)], device=device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    return keep_going

