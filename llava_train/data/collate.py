"""Examples -> a right-padded Batch with token roles and per-row position ids."""

from __future__ import annotations

import torch

from llava_train.data.batch import IGNORE_INDEX, Batch, Example, TokenRole
from llava_train.data.encode import SampleEncoder

__all__ = ["SampleEncoder", "collate"]


def collate(examples: list[Example], pad_token_id: int, image_token_id: int) -> Batch:
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    if pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    width = max(len(e) for e in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    real = attention_mask.bool()
    # Pads may reuse a real id (often eos), so roles come from the mask, not the id, for PAD.
    token_roles = torch.full(shape, int(TokenRole.PAD), dtype=torch.int8)
    token_roles[real] = int(TokenRole.TEXT)
    token_roles[real & (input_ids == image_token_id)] = int(TokenRole.IMAGE)
    position_ids = torch.arange(width).expand(shape) * attention_mask
    images = [image for e in examples for image in e.images]
    owners = [row for row, e in enumerate(examples) for _ in e.images]
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        token_roles=token_roles,
        position_ids=position_ids,
        pixel_values=torch.stack(images) if images else None,
        image_sample_index=torch.tensor(owners, dtype=torch.long),
        keys=[e.key for e in examples],
        meta=[e.meta for e in examples],
    )
