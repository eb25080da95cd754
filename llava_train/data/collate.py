"""Examples -> a right-padded Batch with token roles, per-sample position ids and sequence ids.

`collate_rows` takes rows of one or more Examples: a row with several is packed, one sample
after another. Inside a row each sample's positions restart at 0 and its first label is
ignored, so the last token of one sample never learns to predict the first of the next
(the objective shifts labels by one within a row).

Compact image spans (see `Example`) are expanded here to `tokens_per_image`, the count of
the micro-batch's visual budget, which the Batch records as `visual_budget`. Consecutive
members of one group (a preference pair) share a `group_index`.

`relayout` turns a collated batch into the one collate would have made at another visual
budget (image spans resized, positions and padding redone), for a loss averaged over budgets.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from llava_train.data.batch import IGNORE_INDEX, Batch, Example, TokenRole
from llava_train.data.encode import SampleEncoder

__all__ = ["SampleEncoder", "collate", "collate_planned", "collate_rows", "relayout"]


def collate(examples: list[Example], pad_token_id: int, image_token_id: int, **budget) -> Batch:
    """One example per row."""
    return collate_rows([[e] for e in examples], pad_token_id, image_token_id, **budget)


def collate_planned(batch: list[list[Example]], pad_token_id: int, image_token_id: int) -> Batch:
    """A micro-batch from BatchStream (a PlannedBatch), at the visual budget it was planned for."""
    budget = {k: getattr(batch, k, None) for k in ("tokens_per_image", "visual_budget")}
    return collate_rows(batch, pad_token_id, image_token_id, **budget)


def collate_rows(
    rows: list[list[Example]],
    pad_token_id: int,
    image_token_id: int,
    tokens_per_image: int | None = None,
    visual_budget: int | None = None,
) -> Batch:
    if not rows or not all(rows):
        raise ValueError("cannot collate an empty batch or an empty row")
    if pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    width = max(sum(e.len_at(tokens_per_image) for e in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    examples, images, owners = [], [], []
    for row, samples in enumerate(rows):
        start = 0
        for example in samples:
            ids, targets = example.expanded(tokens_per_image)
            end = start + len(ids)
            input_ids[row, start:end] = torch.tensor(ids, dtype=torch.long)
            labels[row, start:end] = torch.tensor(targets, dtype=torch.long)
            if start > 0:
                labels[row, start] = IGNORE_INDEX
            position_ids[row, start:end] = torch.arange(end - start)
            sequence_ids[row, start:end] = len(examples)
            examples.append(example)
            images += example.images  # row-major order: the order of the placeholder spans
            owners += [row] * len(example.images)
            start = end
    real = sequence_ids >= 0
    # Pads may reuse a real id (often eos), so roles come from the mask, not the id, for PAD.
    token_roles = torch.full(shape, int(TokenRole.PAD), dtype=torch.int8)
    token_roles[real] = int(TokenRole.TEXT)
    token_roles[real & (input_ids == image_token_id)] = int(TokenRole.IMAGE)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=real.long(),
        token_roles=token_roles,
        position_ids=position_ids,
        pixel_values=torch.stack(images) if images else None,
        image_sample_index=torch.tensor(owners, dtype=torch.long),
        sequence_ids=sequence_ids,
        packed=any(len(row) > 1 for row in rows),
        keys=[e.key for e in examples],
        meta=[e.meta for e in examples],
        visual_budget=visual_budget,
        group_index=torch.tensor(group_indices(examples), dtype=torch.long),
        group_members=[e.member for e in examples],
    )


def group_indices(examples: list[Example]) -> list[int]:
    """Group number per sample: a group's members are consecutive (batching keeps them together); a new group
    starts where the key changes or a member name repeats (the same record twice). Ungrouped: one each."""
    out, group, members, previous = [], -1, set(), None
    for example in examples:
        if not example.group or example.group != previous or example.member in members:
            group, members = group + 1, set()
        members.add(example.member)
        previous = example.group
        out.append(group)
    return out


def relayout(batch: Batch, old_tokens: int, new_tokens: int, visual_budget: int | None, pad_token_id: int) -> Batch:
    """A right-padded batch whose image spans hold `old_tokens` tokens each, as collate would lay it out with
    `new_tokens` per span at `visual_budget`: every span resized (its first token repeated, the rest dropped;
    image tokens carry no label), positions restarted per sample, rows re-padded. Pixels are unchanged."""
    roles = batch.token_roles.long()
    image = roles == int(TokenRole.IMAGE)
    images = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
    if int(image.sum()) != images * old_tokens:
        raise ValueError(f"the batch has {int(image.sum())} image tokens, not {images} images x {old_tokens}")
    # Index of each image token within its run of image tokens (consecutive spans, e.g. AnyRes tiles, abut).
    at = torch.arange(roles.shape[1], device=roles.device).expand_as(roles)
    run_start = torch.where(image, -1, at).cummax(dim=1).values + 1
    span_first = image & ((at - run_start) % old_tokens == 0)
    repeats = torch.where(image, span_first.long() * new_tokens, (roles != int(TokenRole.PAD)).long())
    fields = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "token_roles": int(TokenRole.PAD), "sequence_ids": -1}
    rows = {name: [t.repeat_interleave(r) for t, r in zip(getattr(batch, name), repeats)] for name in fields}
    width = max(len(row) for row in rows["input_ids"])
    out = {
        name: torch.stack([F.pad(row, (0, width - len(row)), value=fill) for row in rows[name]])
        for name, fill in fields.items()
    }
    sequence_ids = out["sequence_ids"]
    real = sequence_ids >= 0
    # Positions restart at each sample's first token: subtract the index where its sequence id began.
    at = torch.arange(width, device=roles.device).expand_as(sequence_ids)
    begins = torch.ones_like(real)
    begins[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    start = torch.where(begins, at, 0).cummax(dim=1).values
    out["position_ids"] = torch.where(real, at - start, 0)
    return dataclasses.replace(batch, **out, attention_mask=real.long(), visual_budget=visual_budget)
