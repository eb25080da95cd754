"""The tensor math of the `dpo` objective (llava_train/objectives/dpo.py): no model, no globals.

- `preference_loss`: DPO and its variants from the log-ratio margin.
- `token_logprobs` / `sequence_scores`: per response token log-probs (chunked, never full logits) and their
  (weighted) sums or means per sample; everything the objective compares is built from per-token values, so a
  precomputed reference (stored per token) and dense DPO's token weights fit the same path.
- `diff_token_weights`: RLHF-V's dense DPO weights (gamma on the tokens a diff of chosen vs rejected changed).
- `random_resized_crop` / `mdpo_terms`: mDPO's corrupted image and its conditional and anchor terms.
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F

import kernels
from llava_train.data.batch import IGNORE_INDEX, Batch


def preference_loss(margin: torch.Tensor, beta: float, loss: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss from the log-ratio margin (pi_c - ref_c) - (pi_r - ref_r)."""
    if loss == "sigmoid":
        return -F.logsigmoid(beta * margin)
    if loss == "robust":
        eps = label_smoothing
        return -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
    if loss == "hinge":
        return torch.relu(1 - beta * margin)
    if loss == "ipo":
        return (margin - 1 / (2 * beta)).square()
    raise ValueError(f"unknown preference loss {loss!r}")


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, batch: Batch, chunk_size: int):
    """(log-prob of each response token [K], the sample it belongs to [K]), tokens in row-major order.

    Each supervised position is its own "sequence" of `kernels.sequence_logprobs`, so the values stay
    per token with gradients, computed chunk by chunk as for sums."""
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    index = torch.zeros_like(targets)
    index[keep] = torch.arange(count, device=targets.device)
    logps = kernels.sequence_logprobs(
        hidden[:, :-1], head.weight, targets, bias=getattr(head, "bias", None), chunk_size=chunk_size,
        sequence_ids=index, num_sequences=count,
    )
    # the label at t+1 belongs to the sample at t (padding carries no label, so its id -1 never counts)
    return logps, batch.sequence_ids[:, :-1][keep]


def sequence_scores(logps: torch.Tensor, sample: torch.Tensor, weights: torch.Tensor, num_samples: int, mean: bool):
    """Per sample: sum of weights x log-probs, or that divided by the sum of weights (`mean`)."""
    total = logps.new_zeros(num_samples).index_add(0, sample, weights * logps)
    if not mean:
        return total
    return total / weights.new_zeros(num_samples).index_add(0, sample, weights).clamp(min=1e-6)


def response_tokens(batch: Batch) -> list[list[int]]:
    """The supervised (response) token ids of each sample, in order."""
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    ids, sample = targets[keep].tolist(), batch.sequence_ids[:, :-1][keep].tolist()
    out: list[list[int]] = [[] for _ in range(batch.num_samples)]
    for token, s in zip(ids, sample):
        out[s].append(token)
    return out


def diff_changed(chosen: list[int], rejected: list[int]) -> tuple[list[bool], list[bool]]:
    """Which tokens of each side a token-level diff marks as changed (not in a matching block)."""
    changed_c, changed_r = [True] * len(chosen), [True] * len(rejected)
    matcher = difflib.SequenceMatcher(a=chosen, b=rejected, autojunk=False)
    for block in matcher.get_matching_blocks():
        changed_c[block.a : block.a + block.size] = [False] * block.size
        changed_r[block.b : block.b + block.size] = [False] * block.size
    return changed_c, changed_r


def diff_token_weights(tokens: list[list[int]], chosen: list[int], rejected: list[int], gamma: float):
    """Per sample, per response token: gamma where the diff of its pair marks it changed, else 1."""
    weights = [[1.0] * len(t) for t in tokens]
    for c, r in zip(chosen, rejected):
        changed_c, changed_r = diff_changed(tokens[c], tokens[r])
        weights[c] = [gamma if x else 1.0 for x in changed_c]
        weights[r] = [gamma if x else 1.0 for x in changed_r]
    return weights


# ----------------------------------------------------------------------------- mDPO


def crop_box(height: int, width: int, generator: torch.Generator, min_area: float, max_area: float):
    """(top, left, h, w) of a random crop keeping a fraction U(min_area, max_area) of the area, aspect ratio
    log-uniform in [3/4, 4/3] (torchvision's RandomResizedCrop ranges), clamped to the image."""
    u = torch.rand(4, generator=generator).tolist()
    area = height * width * (min_area + (max_area - min_area) * u[0])
    ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w


def random_resized_crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """[3, H, W] -> the box resized back to [3, H, W] (bilinear). Cropping the normalised pixels equals
    normalising the cropped image: the normalisation is per channel and affine, interpolation linear."""
    top, left, h, w = box
    crop = image[None, :, top : top + h, left : left + w].float()
    return F.interpolate(crop, size=image.shape[-2:], mode="bilinear", align_corners=False)[0].to(image.dtype)


def mdpo_terms(chosen_ratio: torch.Tensor, corrupted_ratio: torch.Tensor, beta: float, anchor: float):
    """mDPO's extra per-pair terms: (conditional, anchor).

    conditional: -log sigmoid(beta (r(y_w | image) - r(y_w | corrupted image))), the chosen answer must be
    likelier with the real image than with a corrupted one; anchor: -log sigmoid(beta r(y_w | image) - delta),
    the chosen reward must stay above delta. r = log pi - log pi_ref."""
    conditional = -F.logsigmoid(beta * (chosen_ratio - corrupted_ratio))
    return conditional, -F.logsigmoid(beta * chosen_ratio - anchor)
