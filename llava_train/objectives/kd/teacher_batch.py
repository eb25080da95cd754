"""The student's batch as the teacher reads it, when the teacher's tower or connector differs.

Text (prompt and response) is the same token sequence for both models; only each image's span
length (the connector's token count), the pixel size (the tower's input) and the pixel normalisation
(the towers' mean/std) may differ. The
batch is taken apart into its samples with one compact image slot per span and collated again
at the teacher's count, so positions, packing and sequence ids follow the usual rules. Response
positions then correspond one to one, in order: both batches' supervised masks hold the same
labels in the same row-major order (tests/test_kd.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava_train.data.batch import Batch, Example, TokenRole
from llava_train.data.collate import collate_rows


@dataclass(frozen=True)
class PixelMap:
    """The student's normalised pixels in the teacher's normalisation, per channel: (x * std_s + mean_s - mean_t)
    / std_t = x * scale + shift. Exact, since both normalisations are affine maps of the same [0, 1] pixels."""

    scale: tuple[float, float, float]
    shift: tuple[float, float, float]

    @classmethod
    def between(cls, student, teacher) -> PixelMap | None:
        """From two ImageProcessors; None when their mean and std agree."""
        if student.mean == teacher.mean and student.std == teacher.std:
            return None
        scale = tuple(s / t for s, t in zip(student.std, teacher.std))
        shift = tuple((ms - mt) / t for ms, mt, t in zip(student.mean, teacher.mean, teacher.std))
        return cls(scale, shift)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        scale = pixels.new_tensor(self.scale, dtype=torch.float32).view(3, 1, 1)
        shift = pixels.new_tensor(self.shift, dtype=torch.float32).view(3, 1, 1)
        return (pixels.float() * scale + shift).to(pixels.dtype)


def teacher_batch(batch: Batch, student_tokens: int, teacher_tokens: int, image_size: int, pad_id: int,
                  image_token_id: int, pixel_map: PixelMap | None = None) -> Batch:  # fmt: skip
    """`batch` unchanged when the teacher reads it as is; else rebuilt for the teacher."""
    pixels = batch.pixel_values
    if pixels is not None and pixel_map is not None:
        pixels = pixel_map(pixels)
    if pixels is not None and pixels.shape[-1] != image_size:
        # The student's crop, resized (bicubic is linear, so it commutes with the pixel map): a teacher that crops
        # differently (another shortest edge, pad against resize) sees the student's framing (docs).
        pixels = F.interpolate(pixels.float(), size=(image_size, image_size), mode="bicubic", align_corners=False)
        pixels = pixels.to(batch.pixel_values.dtype)
    if student_tokens == teacher_tokens and batch.visual_budget is None:
        return batch if pixels is batch.pixel_values else Batch(**{**vars(batch), "pixel_values": pixels})
    rows = _compact_rows(batch, student_tokens, pixels)
    rebuilt = collate_rows(rows, pad_id, image_token_id, tokens_per_image=teacher_tokens)
    return rebuilt.to(batch.input_ids.device)


def _compact_rows(batch: Batch, tokens_per_image: int, pixels) -> list[list[Example]]:
    """Each row's samples with every image span held as one compact slot, and their images."""
    images = list(pixels) if pixels is not None else []
    rows, image = [], 0
    for row in range(batch.input_ids.shape[0]):
        ids, labels = batch.input_ids[row].tolist(), batch.labels[row].tolist()
        roles, seq = batch.token_roles[row].tolist(), batch.sequence_ids[row].tolist()
        samples, t = [], 0
        while t < len(ids) and seq[t] >= 0:
            sample = seq[t]
            example = Example([], [], key=batch.keys[sample] if batch.keys else "")
            slots = []
            while t < len(ids) and seq[t] == sample:
                if roles[t] == int(TokenRole.IMAGE):  # one span: tokens_per_image image tokens
                    slots.append(len(example.input_ids))
                    example.input_ids.append(ids[t])
                    example.labels.append(labels[t])
                    example.images.append(images[image])
                    image, t = image + 1, t + tokens_per_image
                else:
                    example.input_ids.append(ids[t])
                    example.labels.append(labels[t])
                    t += 1
            example.image_slots = tuple(slots)
            samples.append(example)
        rows.append(samples)
    return rows
