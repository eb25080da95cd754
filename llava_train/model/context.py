"""The forward context: what any submodule may know about the forward it runs in.

`MultimodalLM.forward` activates one `ForwardContext` for its duration. A wrapped decoder layer,
a router or a connector calls `current()` and reads token roles, sequence ids and per-sample
positions (packed or not), image spans, the training step, a generator keyed by
(seed, step, micro-step, rank, name), and reports auxiliary losses and metrics. Nothing is
passed through the HF decoder's signature, so no per-family copy of layer code is needed.

Gradient checkpointing recomputes layers during the backward, long after `forward` returned.
`checkpoint_context_fn` (passed to torch's non-reentrant checkpoint) re-activates the same context
for the recompute, marked `recomputing`: a recomputed layer sees identical roles and draws
identical random numbers, and its auxiliary losses are not counted a second time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

import torch

from llava_train.data.batch import Batch, TokenRole

_ACTIVE: ContextVar["ForwardContext | None"] = ContextVar("llava_train_forward_context", default=None)


@dataclass(frozen=True)
class RunState:
    """Where in the run a forward happens; the trainer updates it before each micro-batch."""

    seed: int = 0
    step: int = 0  # optimizer steps completed before this forward
    micro_step: int = 0  # index of the micro-batch within the step
    rank: int = 0


class AuxStore:
    """Auxiliary losses and metrics reported during one forward.

    A name reported several times (once per layer) is reduced by the reporter's explicit choice,
    `mean` or `sum`; mixing the two for one name is an error. Metrics are averaged per name.
    """

    def __init__(self) -> None:
        self._losses: dict[str, list[torch.Tensor]] = {}
        self._reduce: dict[str, str] = {}
        self._metrics: dict[str, list[float]] = {}

    def add_loss(self, name: str, value: torch.Tensor, reduce: Literal["mean", "sum"]) -> None:
        if reduce not in ("mean", "sum"):
            raise ValueError(f"aux loss `{name}`: reduce must be 'mean' or 'sum', got {reduce!r}")
        if self._reduce.setdefault(name, reduce) != reduce:
            raise ValueError(f"aux loss `{name}` is reported with both reduce='mean' and reduce='sum'")
        self._losses.setdefault(name, []).append(value)

    def add_metric(self, name: str, value: float | torch.Tensor) -> None:
        self._metrics.setdefault(name, []).append(float(value))

    def losses(self) -> dict[str, torch.Tensor]:
        reduced = {}
        for name, values in self._losses.items():
            total = torch.stack([v.float().reshape(()) for v in values]).sum()
            reduced[name] = total / len(values) if self._reduce[name] == "mean" else total
        return reduced

    def metrics(self) -> dict[str, float]:
        return {name: sum(values) / len(values) for name, values in self._metrics.items()}


@dataclass
class ForwardContext:
    token_roles: torch.Tensor  # [B, T] int8 TokenRole
    sequence_ids: torch.Tensor  # [B, T] long: sample index, -1 on padding (several per row when packed)
    position_ids: torch.Tensor  # [B, T] long: restart at 0 per sample
    image_sample_index: torch.Tensor  # [N_images] long: the row of each image
    tokens_per_image: int
    packed: bool
    sample_keys: list[str] = field(default_factory=list)  # by sequence id: the record keys of the samples
    run: RunState = field(default_factory=RunState)
    training: bool = True
    adapters_disabled: bool = False  # set by `model.adapters_disabled()`: adapters and modules act as the base
    recomputing: bool = False  # a gradient-checkpoint recompute: aux reports are ignored
    aux: AuxStore = field(default_factory=AuxStore)
    scratch: dict = field(default_factory=dict)  # per-forward state modules share (e.g. a block's routing)

    @classmethod
    def for_batch(cls, batch: Batch, tokens_per_image: int, **kwargs) -> "ForwardContext":
        return cls(
            token_roles=batch.token_roles,
            sequence_ids=batch.sequence_ids,
            position_ids=batch.position_ids,
            image_sample_index=batch.image_sample_index,
            tokens_per_image=tokens_per_image,
            packed=batch.packed,
            sample_keys=list(batch.keys),
            **kwargs,
        )

    # ------------------------------------------------------------------ roles

    @property
    def image_mask(self) -> torch.Tensor:
        return self.token_roles == int(TokenRole.IMAGE)

    @property
    def text_mask(self) -> torch.Tensor:
        return self.token_roles == int(TokenRole.TEXT)

    def image_spans(self) -> list[tuple[int, int, int, int]]:
        """(row, start, end, sample id) of each image's visual tokens, in image order.

        Every image of a forward has `tokens_per_image` tokens, and images are laid out in row-major
        order, so the k-th run of that many image tokens is image k (also for adjacent AnyRes tiles).
        """
        spans = []
        for row in range(self.token_roles.shape[0]):
            positions = torch.nonzero(self.image_mask[row]).flatten().tolist()
            for first in range(0, len(positions), self.tokens_per_image):
                start = positions[first]
                spans.append((row, start, start + self.tokens_per_image, int(self.sequence_ids[row, start])))
        return spans

    # ------------------------------------------------------------------ randomness and reports

    def generator(self, name: str, per_rank: bool = True, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator for `name`, seeded from (seed, step, micro-step, rank if `per_rank`, name).

        Asking twice in one forward gives the same stream: a checkpoint recompute redraws exactly
        what the forward drew, and a resumed run repeats every draw.
        """
        r = self.run
        key = f"{r.seed}/{r.step}/{r.micro_step}/{r.rank if per_rank else '*'}/{name}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen

    def add_loss(self, name: str, value: torch.Tensor, reduce: Literal["mean", "sum"] = "mean") -> None:
        """Report an auxiliary loss term (already weighted); the trainer adds it to the loss once."""
        if not self.recomputing:
            self.aux.add_loss(name, value, reduce)

    def add_metric(self, name: str, value: float | torch.Tensor) -> None:
        if not self.recomputing:
            self.aux.add_metric(name, value if isinstance(value, float) else float(value.detach()))


def current() -> ForwardContext:
    """The active forward's context; raises outside a `MultimodalLM` forward."""
    ctx = _ACTIVE.get()
    if ctx is None:
        raise RuntimeError(
            "no forward context is active: this module reads token roles from MultimodalLM.forward "
            "(or a context activated with llava_train.model.context.activate)"
        )
    return ctx


def maybe_current() -> ForwardContext | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(ctx: ForwardContext):
    token = _ACTIVE.set(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def during_generation(decoder: torch.nn.Module, prompt: ForwardContext):
    """Forward contexts for a KV-cached decode loop that someone else drives (the LM's `generate`).

    The first decoder call (the prefill) runs under the prompt's context; each later call feeds
    only new tokens, which are text, and runs under a context describing just those tokens.
    """
    calls = 0

    def select(module, args, kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            _ACTIVE.set(prompt)
            return
        new = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        rows, length = new.shape[:2]
        device = prompt.token_roles.device
        positions = kwargs.get("position_ids")
        _ACTIVE.set(
            dataclasses.replace(
                prompt,
                token_roles=torch.full((rows, length), int(TokenRole.TEXT), dtype=torch.int8, device=device),
                sequence_ids=torch.arange(rows, device=device)[:, None].expand(rows, length),
                position_ids=positions if positions is not None else torch.zeros(rows, length, dtype=torch.long),
                image_sample_index=prompt.image_sample_index[:0],
                aux=AuxStore(),
            )
        )

    handle = decoder.register_forward_pre_hook(select, with_kwargs=True)
    token = _ACTIVE.set(prompt)
    try:
        yield
    finally:
        handle.remove()
        _ACTIVE.reset(token)


def checkpoint_context_fn():
    """For `torch.utils.checkpoint(..., use_reentrant=False, context_fn=...)`: the forward runs as
    is; the recompute runs under the same context, marked as a recompute."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), activate(dataclasses.replace(ctx, recomputing=True))
