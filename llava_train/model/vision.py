"""The vision tower: any Hugging Face vision encoder (CLIP, SigLIP, ...), read at one layer."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig


class VisionTower(nn.Module):
    """Wraps an HF vision encoder and returns the patch features the connector reads.

    `feature_layer` indexes `hidden_states` (LLaVA reads the penultimate layer, -2).
    Towers with a CLS token (CLIP) drop it unless `use_cls`; towers without one (SigLIP)
    return every patch.
    """

    def __init__(self, encoder: nn.Module, feature_layer: int = -2, use_cls: bool = False):
        super().__init__()
        self.encoder = encoder
        self.feature_layer = feature_layer
        self.use_cls = use_cls
        num_layers = self.config.num_hidden_layers
        if not -num_layers - 1 <= feature_layer <= num_layers:
            raise ValueError(
                f"vision feature_layer={feature_layer} is out of range for a tower with {num_layers} layers "
                f"(valid: {-num_layers - 1}..{num_layers})"
            )

    @property
    def config(self) -> PretrainedConfig:
        return self.encoder.config

    @property
    def has_cls_token(self) -> bool:
        return hasattr(getattr(self.encoder, "embeddings", None), "class_embedding") or hasattr(
            getattr(getattr(self.encoder, "vision_model", None), "embeddings", None), "class_embedding"
        )

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    @property
    def num_features(self) -> int:
        """Tokens per image handed to the connector."""
        keep_cls = self.has_cls_token and self.use_cls
        return self.num_patches + int(keep_cls)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def layers_used(self) -> int:
        """Encoder layers that feed the read-out layer; the rest would be wasted compute."""
        num_layers = self.config.num_hidden_layers
        return self.feature_layer % (num_layers + 1)

    @property
    def runs_layer_prefix(self) -> bool:
        return self.config.model_type in DIRECT_TOWERS

    @property
    def layers_run(self) -> int:
        """Encoder layers a forward runs: only those used, except on the generic full-depth path."""
        return self.layers_used if self.runs_layer_prefix else self.config.num_hidden_layers

    @property
    def sequence_length(self) -> int:
        """Tokens every encoder layer processes: the patches, plus the CLS token if the tower has one."""
        return self.num_patches + int(self.has_cls_token)

    def executed_modules(self) -> list[nn.Module]:
        """The submodules a forward runs, in order (what FLOPs are counted over)."""
        if not self.runs_layer_prefix:
            return [self.encoder]
        pre_norm = getattr(self.encoder, "pre_layrnorm", None)
        prefix = [self.encoder.embeddings] + ([pre_norm] if pre_norm is not None else [])
        return prefix + list(self.encoder.encoder.layers[: self.layers_used])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.runs_layer_prefix:
            features = self._run_layer_prefix(pixel_values)
        else:  # any other HF encoder: the generic (but full-depth) path
            features = self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[
                self.feature_layer
            ]
        if self.has_cls_token and not self.use_cls:
            features = features[:, 1:]
        return features

    def _run_layer_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embeddings and only the layers up to `feature_layer` (LLaVA's -2 skips the last layer).

        Equals `hidden_states[feature_layer]` of the full encoder (the export test checks it
        against transformers' Llava) without running layers whose output nobody reads.
        """
        hidden = self.encoder.embeddings(pixel_values)
        pre_norm = getattr(self.encoder, "pre_layrnorm", None)  # CLIP normalises before layer 0
        if pre_norm is not None:
            hidden = pre_norm(hidden)
        for layer in self.encoder.encoder.layers[: self.layers_used]:
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden


# Towers whose layer stack llava_train runs itself (embeddings -> [pre-norm] -> encoder.layers).
DIRECT_TOWERS = ("clip_vision_model", "siglip_vision_model")


def build_vision_encoder(path: str | None, config: dict | None, attn_implementation: str) -> nn.Module:
    """An HF vision encoder from a local pretrained folder or from a config dict."""
    if path is not None:
        hf_config = AutoConfig.from_pretrained(path)
        hf_config = getattr(hf_config, "vision_config", hf_config)  # a full CLIP/SigLIP folder
        return AutoModel.from_pretrained(path, config=hf_config, attn_implementation=attn_implementation)
    return AutoModel.from_config(vision_config_from_dict(config), attn_implementation=attn_implementation)


def vision_config_from_dict(config: dict) -> PretrainedConfig:
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError("model.vision.config needs a `model_type` (e.g. clip_vision_model, siglip_vision_model)")
    return AutoConfig.for_model(model_type, **config)
