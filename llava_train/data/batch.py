"""The two data types every stage of the pipeline agrees on.

`Example` is one tokenised sample; `Batch` is what the model and objectives see.
Token roles are first-class: every batch says, per token, whether it is text, an
image token or padding, and which sample it belongs to (`sequence_ids`, also when
several samples are packed into one row), so modules (mixture-of-depths, Matryoshka,
KD) read the roles instead of recomputing image spans or sample boundaries.
"""

from __future__ import annotations

import dataclasses
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
    image placeholder span in `input_ids`, in order of appearance.

    A span is either already expanded (the image token repeated the connector's fixed
    count) or, when the count depends on the step's visual budget, held compact: ONE image
    token at each position in `image_slots`, expanded by collate for the micro-batch's
    budget. Lengths that batching compares come from `len_at(tokens_per_image)`.
    """

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    key: str = ""
    meta: dict = field(default_factory=dict)
    source: str = ""  # the data source (mixture entry) it came from
    image_slots: tuple[int, ...] = ()  # positions of compact image spans (one token each)
    group: str = ""  # key of the group (e.g. a preference pair) this sample belongs to; "" = none
    member: str = ""  # its name in the group (e.g. "chosen", "rejected")

    @property
    def has_images(self) -> bool:
        return bool(self.images)

    def __len__(self) -> int:
        return len(self.input_ids)  # as stored: compact spans count one token

    def len_at(self, tokens_per_image: int | None) -> int:
        """Length once each compact span holds `tokens_per_image` tokens."""
        if not self.image_slots:
            return len(self.input_ids)
        return len(self.input_ids) + len(self.image_slots) * (_count(tokens_per_image, self.key) - 1)

    def expanded(self, tokens_per_image: int | None) -> tuple[list[int], list[int]]:
        """(input_ids, labels) with each compact span expanded to `tokens_per_image` image tokens."""
        if not self.image_slots:
            return self.input_ids, self.labels
        n = _count(tokens_per_image, self.key)
        ids, labels, at = [], [], 0
        for slot in self.image_slots:
            ids += self.input_ids[at:slot] + [self.input_ids[slot]] * n
            labels += self.labels[at:slot] + [IGNORE_INDEX] * n
            at = slot + 1
        return ids + self.input_ids[at:], labels + self.labels[at:]


def _count(tokens_per_image: int | None, key: str) -> int:
    if tokens_per_image is None:
        raise ValueError(
            f"sample {key!r} holds compact image spans, whose size depends on the visual budget; "
            "pass the micro-batch's tokens_per_image (BatchStream plans them with the connector's VisualTokens)"
        )
    return tokens_per_image


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, IGNORE_INDEX where unsupervised
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    token_roles: torch.Tensor  # [B, T] int8, TokenRole values
    position_ids: torch.Tensor  # [B, T] long, restarting at 0 for each sample of a packed row; 0 on padding
    pixel_values: torch.Tensor | None  # [N_images, 3, H, W] or None
    image_sample_index: torch.Tensor  # [N_images] long: which row each image belongs to
    sequence_ids: torch.Tensor  # [B, T] long: index (into `keys`) of the sample each token belongs to; -1 on padding
    packed: bool = False  # some row holds several samples: attention must be block-diagonal
    keys: list[str] = field(default_factory=list)  # one per sample, in sequence-id order
    meta: list[dict] = field(default_factory=list)
    visual_budget: int | None = None  # the connector budget the image spans were expanded for (None: full)
    # Grouped samples (preference pairs): which group each sample (sequence id) is in, and its member name.
    group_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [num_samples]
    group_members: list[str] = field(default_factory=list)  # one per sample: "chosen", "rejected", or ""

    @property
    def num_supervised_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_samples(self) -> int:
        return len(self.keys)  # rows count samples only when nothing is packed

    @property
    def num_groups(self) -> int:
        return int(self.group_index.max()) + 1 if self.group_index.numel() else 0

    def image_copies(self) -> torch.Tensor | None:
        """For each image, the index of the first image equal to it within its group (a preference pair's members
        carry the same images); None when no image repeats. Pixels are compared, so only true copies count."""
        if self.pixel_values is None or self.num_groups >= self.num_samples:
            return None  # every group has one member: nothing to share
        groups = self.group_index[self.image_sample_index].tolist()
        source, firsts = list(range(len(groups))), {}
        for image, group in enumerate(groups):
            for earlier in firsts.get(group, []):
                if torch.equal(self.pixel_values[image], self.pixel_values[earlier]):
                    source[image] = earlier
                    break
            else:
                firsts.setdefault(group, []).append(image)
        return None if source == list(range(len(groups))) else torch.tensor(source)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """Tensors to `device`; `dtype` applies to the pixels only."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        if self.pixel_values is not None:
            moved["pixel_values"] = self.pixel_values.to(device=device, dtype=dtype or self.pixel_values.dtype)
        return dataclasses.replace(self, **moved)
