"""RDist (LLaVA-KD): the student learns how the teacher's visual tokens relate to each other.

Per image, the self-similarity (Gram) matrix of its visual tokens' features, [n, n]; the loss is
1 - cosine between the teacher's and the student's flattened Gram matrices. Feature widths may
differ (the Gram matrix is n x n whatever the width), the token counts may not. Invariants
(tests/test_kd.py): zero for identical features; unchanged when either side's features are
scaled, or when the tokens of both are permuted alike.

At level `logits` (the released trainer) the features are the LM head's outputs at the visual
positions, `h W^T + b`, whose Gram matrix is `h (W^T W) h^T` plus bias terms: [D, D] and [n, n]
tensors only, never the `[n, V]` logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gram(features: Tensor) -> Tensor:
    """[images, n, d] -> [images, n, n] in fp32."""
    features = features.float()
    return features @ features.transpose(-1, -2)


def logits_gram(hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """gram(hidden @ weight.T + bias) for hidden [images, n, D], without the [n, V] logits."""
    hidden, weight = hidden.float(), weight.float()
    out = hidden @ (weight.T @ weight) @ hidden.transpose(-1, -2)
    if bias is not None:
        bias = bias.float()
        u = hidden @ (weight.T @ bias)  # [images, n]: <logits_i - b, b>
        out = out + u[..., :, None] + u[..., None, :] + bias @ bias
    return out


def relation_loss(student_gram: Tensor, teacher_gram: Tensor) -> Tensor:
    """1 - cos(flattened Gram matrices) per image [images]."""
    return 1 - F.cosine_similarity(student_gram.flatten(1), teacher_gram.flatten(1).to(student_gram), dim=1)


def per_image(features: Tensor, tokens_per_image: int) -> Tensor:
    """[images * n, d] (visual positions in row-major order) -> [images, n, d]."""
    return features.reshape(-1, tokens_per_image, features.shape[-1])


class Capture:
    """Records the connectors' outputs during one forward (RDist at level `projector`)."""

    def __init__(self, student_connector, teacher_connector, on: bool):
        self.modules = {"student": student_connector, "teacher": teacher_connector} if on else {}
        self.student = self.teacher = None
        self._handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(lambda m, args, out, name=name: setattr(self, name, out)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
