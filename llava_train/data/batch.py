"""The two data types every stage of the pipeline agrees on.

`Example` is one tokenised sample; `Batch` is what the model and objectives see.
Token roles are first-class: every batch says, per token, whether it is text, an
image token or padding, so modules (mixture-of-depths, Matryoshka, KD) read the
roles instead of recomputing image spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch

IGNORE_INDEX = -100


class TokenRole(IntEnum):
    TEXT = 0
    IMAGE = 1
    PAD = 2


@dataclass
class Example:
    """One tokenised sample. `images` holds one preprocessed [3, H, W] tensor per
    image placeholder span in `input_ids`, in order of appearance."""

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    key: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, IGNORE_INDEX where unsupervised
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    token_roles: torch.Tensor  # [B, T] int8, TokenRole values
    position_ids: torch.Tensor  # [B, T] long
    pixel_values: torch.Tensor | None  # [N_images, 3, H, W] or None
    image_sample_index: torch.Tensor  # [N_images] long: which row each image belongs to
    keys: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    @property
    def num_supervised_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        pixels = self.pixel_values
        if pixels is not None:
            pixels = pixels.to(device=device, dtype=dtype or pixels.dtype)
        return Batch(
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            attention_mask=self.attention_mask.to(device),
            token_roles=self.token_roles.to(device),
            position_ids=self.position_ids.to(device),
            pixel_values=pixels,
            image_sample_index=self.image_sample_index.to(device),
            keys=self.keys,
            meta=self.meta,
        )
