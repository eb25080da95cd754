"""Stages are named presets of which parts train; a recipe may override any part of a preset."""

from __future__ import annotations

from dataclasses import dataclass

from llava_train.recipe import StageConfig


@dataclass(frozen=True)
class StagePreset:
    vision: bool
    connector: bool
    lm: bool
    lora: bool  # LM trains through LoRA adapters rather than its full weights


PRESETS: dict[str, StagePreset] = {
    # LLaVA stage 1: align the connector; everything else frozen.
    "pretrain": StagePreset(vision=False, connector=True, lm=False, lora=False),
    # LLaVA stage 2: connector + full LM.
    "sft": StagePreset(vision=False, connector=True, lm=True, lora=False),
    # LLaVA stage 2 with LoRA on the LM (the connector still trains fully).
    "sft_lora": StagePreset(vision=False, connector=True, lm=True, lora=True),
}


def resolve_stage(stage: StageConfig) -> StagePreset:
    """The preset for `stage.name` with the recipe's `trainable` overrides applied."""
    preset = PRESETS[stage.name]
    pick = lambda override, default: default if override is None else override  # noqa: E731
    return StagePreset(
        vision=pick(stage.trainable.vision, preset.vision),
        connector=pick(stage.trainable.connector, preset.connector),
        lm=pick(stage.trainable.lm, preset.lm),
        lora=preset.lora,
    )
