"""Build the multimodal model from a recipe: local pretrained folders or config dicts, never a hub."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from llava_train.data.templates import IMAGE_TOKEN, ensure_image_token
from llava_train.model.connectors import build_connector
from llava_train.model.lora import add_lora, is_peft
from llava_train.model.mllm import MultimodalLM
from llava_train.model.stages import StagePreset, resolve_stage
from llava_train.model.vision import VisionTower, build_vision_encoder
from llava_train.model.zero3 import partitioned_loading
from llava_train.recipe import ModelConfig, StageConfig

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_image_token(tokenizer)
    if tokenizer.pad_token is None:
        # Padding positions are masked and unsupervised, so any token will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def build_language_model(path: str | None, config: dict | PretrainedConfig | None, attn: str) -> nn.Module:
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    if isinstance(config, dict):
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ValueError("model.lm.config needs a `model_type` (e.g. llama, qwen2)")
        config = AutoConfig.for_model(model_type, **config)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def build_model(cfg: ModelConfig, tokenizer, zero3_config: dict | None = None, seed: int = 0) -> MultimodalLM:
    """Vision tower + connector + LM, with the LM's vocabulary grown to fit the tokenizer.

    With `zero3_config` (a ZeRO-3 DeepSpeed config), parts loaded from a pretrained folder
    are built directly into partitions. Random-init parts (config dicts: tests, the demo)
    are built whole and partitioned when the engine starts, which keeps their initial
    weights identical to a non-ZeRO run.
    """
    attn = resolve_attn_implementation(cfg.attn_implementation)
    with partitioned_loading(zero3_config if cfg.vision.path else None):
        encoder = build_vision_encoder(cfg.vision.path, cfg.vision.config, attn)
    vision = VisionTower(encoder, cfg.vision.feature_layer, cfg.vision.use_cls)
    with partitioned_loading(zero3_config if cfg.lm.path else None):
        lm = build_language_model(cfg.lm.path, cfg.lm.config, attn)
        fit_vocabulary(lm, tokenizer)  # gathers the embedding partitions while the context says ZeRO-3
    return assemble(vision, lm, tokenizer, cfg.connector.type, cfg.connector.options, seed)


def fit_vocabulary(lm: nn.Module, tokenizer) -> None:
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))


def assemble(
    vision: VisionTower, lm: nn.Module, tokenizer, connector_type: str, connector_options: dict, seed: int = 0
):
    fit_vocabulary(lm, tokenizer)
    # The connector's random init comes from its own seed, not from whatever the tower and LM
    # builds drew before it (loading under zero.Init draws differently from a plain load).
    with torch.random.fork_rng(devices=[]):  # CPU generator only: the connector is built on the CPU
        torch.manual_seed(seed)
        connector = build_connector(
            connector_type,
            vision_hidden=vision.hidden_size,
            lm_hidden=lm.config.hidden_size,
            num_features=vision.num_features,
            **connector_options,
        )
    return MultimodalLM(vision, connector, lm, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def resolve_attn_implementation(requested: str) -> str:
    if requested == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            log.warning("flash_attention_2 requested but flash-attn is not installed; falling back to sdpa")
            return "sdpa"
    return requested


# ----------------------------------------------------------------------------- stages


def apply_stage(model: MultimodalLM, stage: StageConfig) -> StagePreset:
    """Freeze/unfreeze parts per the stage preset; wrap the LM in LoRA adapters for `sft_lora`."""
    preset = resolve_stage(stage)
    model.vision.requires_grad_(preset.vision)
    model.connector.requires_grad_(preset.connector)
    model.lm.requires_grad_(preset.lm and not preset.lora)
    if preset.lora and not is_peft(model.lm):  # adapters continued from `init_from` are already there
        model.lm = add_lora(model.lm, stage.lora)
    return preset
