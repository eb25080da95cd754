"""The assembled multimodal LM: vision tower -> connector -> any HF causal LM via `inputs_embeds`."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from llava_train.data.batch import Batch
from llava_train.model import context
from llava_train.model.context import ForwardContext, RunState
from llava_train.model.lora import is_peft
from llava_train.model.packed_attention import packed_attention_inputs
from llava_train.model.vision import VisionTower


class ModelOutput(NamedTuple):
    """A tuple, so ZeRO-3's hooks find the tensors inside (they look into tuples, lists and dicts)."""

    hidden_states: torch.Tensor  # [B, T, D] the LM's last hidden states
    aux_losses: dict[str, torch.Tensor] = {}  # reported by attached modules, once each (a fresh dict per forward)
    aux_metrics: dict[str, float] = {}


class MultimodalLM(nn.Module):
    """Vision tower, connector and language model; no per-family LM subclass.

    `forward` returns the LM's last hidden states and what attached modules reported through
    the forward context; objectives turn them into losses (so no `[tokens, vocab]` logits are
    ever materialised here).
    """

    def __init__(self, vision: VisionTower, connector: nn.Module, lm: nn.Module, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.lm = lm
        self.image_token_id = image_token_id
        self.run_state = RunState()  # the trainer sets it before each micro-batch (seeds per-step draws)
        self._adapters_disabled = False
        self.attachments: list = []  # technique modules attached to this model (llava_train.modules)

    # ------------------------------------------------------------------ parts

    @property
    def tokens_per_image(self) -> int:
        """At the connector's full budget (every connector answers `visual_tokens()`; not all have a fixed count)."""
        return self.connector.visual_tokens().full

    @property
    def output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    @property
    def decoder(self) -> nn.Module:
        return self.lm.get_decoder()

    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "connector": self.connector, "lm": self.lm}

    # ------------------------------------------------------------------ forward

    def encode_images(self, pixel_values: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_tokens(budget), lm_hidden]. A frozen tower keeps no activations."""
        tower_trains = any(p.requires_grad for p in self.vision.parameters())
        context = contextlib.nullcontext() if tower_trains else torch.no_grad()
        with context:
            features = self.vision(pixel_values)
        return self.connector(features, budget=budget)

    def embed(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with each image's visual tokens written over its placeholder span."""
        embeds = self.lm.get_input_embeddings()(batch.input_ids)
        image_slots = batch.input_ids == self.image_token_id
        if batch.pixel_values is None:
            # Run the tower on a dummy image with zero weight, so every rank takes the same
            # path: under ZeRO-3 a rank that skipped the tower would hang its peers' gathers.
            dummy = torch.zeros(1, 3, self.vision.image_size, self.vision.image_size, device=embeds.device)
            visual = self.encode_images(dummy.to(self._vision_dtype()), batch.visual_budget)
            if image_slots.any():
                raise ValueError("batch has <image> placeholder tokens but no pixel_values")
            return embeds + 0.0 * visual.sum().to(embeds.dtype)
        visual = self._encode_batch_images(batch)
        expected = visual.shape[0] * visual.shape[1]
        found = int(image_slots.sum())
        if found != expected:
            raise ValueError(
                f"batch has {found} <image> placeholder tokens but {visual.shape[0]} images x "
                f"{visual.shape[1]} tokens = {expected} at visual budget {batch.visual_budget}; expand each <image> "
                "to the connector's visual_tokens().num_tokens(budget) (collate_rows(tokens_per_image=...))"
            )
        return embeds.masked_scatter(image_slots.unsqueeze(-1), visual.to(embeds.dtype).reshape(-1, embeds.shape[-1]))

    def _encode_batch_images(self, batch: Batch) -> torch.Tensor:
        """The batch's images through tower and connector, each group's copies of an image (a preference pair's
        chosen and rejected) encoded once and shared: the same features, half the tower's work for pairs."""
        pixels = batch.pixel_values.to(self._vision_dtype())
        copies = batch.image_copies()
        if copies is None:
            return self.encode_images(pixels, batch.visual_budget)
        unique, inverse = torch.unique(copies, return_inverse=True)
        encoded = self.encode_images(pixels[unique.to(pixels.device)], batch.visual_budget)
        return encoded[inverse.to(encoded.device)]

    def forward(self, batch: Batch) -> ModelOutput:
        with context.activate(self.forward_context(batch)) as ctx:
            embeds = self.embed(batch)
            if batch.packed:  # several samples per row: block-diagonal causal attention
                attention = packed_attention_inputs(batch.sequence_ids, self.lm.config._attn_implementation, embeds.dtype)
            else:
                attention = {"attention_mask": batch.attention_mask}
            out = self.decoder(inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False, **attention)
        return ModelOutput(out.last_hidden_state, ctx.aux.losses(), ctx.aux.metrics())

    def forward_context(self, batch: Batch) -> ForwardContext:
        return ForwardContext.for_batch(
            batch,
            self.connector.visual_tokens().num_tokens(batch.visual_budget),
            run=self.run_state,
            training=self.training,
            adapters_disabled=self._adapters_disabled,
        )

    # ------------------------------------------------------------------ switches

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Run as the base model: peft's LoRA off, and attached modules told through the forward
        context (`ctx.adapters_disabled`). A flag that forward reads, never a change of
        `requires_grad` (ZeRO fixes its groups at init); the previous value comes back on exit."""
        previous = self._adapters_disabled
        self._adapters_disabled = True
        peft_off = self.lm.disable_adapter() if is_peft(self.lm) else contextlib.nullcontext()
        try:
            with peft_off:
                yield self
        finally:
            self._adapters_disabled = previous

    def enable_gradient_checkpointing(self, vision: bool) -> None:
        """Non-reentrant checkpointing of the LM's layers (and the tower's, when it trains); a
        recomputed layer runs under the forward context of the forward it belongs to."""
        kwargs = {"use_reentrant": False, "context_fn": context.checkpoint_context_fn}
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if vision:
            self.vision.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(kwargs))

    def _vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype
