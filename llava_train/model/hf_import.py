"""A transformers `LlavaForConditionalGeneration` folder -> `MultimodalLM`, for second models and evaluation.

The inverse of `export.py`: the same tower, the mlp projector (same parameter names), and the
language model reassembled as a causal LM from `text_config`. Weights are renamed on the state
dict and loaded with `io.load_weights`, so under ZeRO-3 (`zero3_config`) the parts are built
inside `zero.Init` and filled one parameter at a time: no rank holds the whole model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from llava_train.model.build import assemble, build_language_model, load_tokenizer
from llava_train.model.mllm import MultimodalLM
from llava_train.model.vision import VisionTower
from llava_train.model.zero3 import partitioned_loading


def is_hf_llava_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def load_hf_llava(path: str | Path, zero3_config: dict | None = None) -> tuple[MultimodalLM, object]:
    from llava_train.model.io import load_weights  # io imports this module's callers; keep the cycle lazy

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    if config.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"{path}: vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not supported")
    tokenizer = load_tokenizer(str(path))
    with partitioned_loading(zero3_config):
        encoder = AutoModel.from_config(config.vision_config, attn_implementation="sdpa")
        lm = build_language_model(None, config.text_config, "sdpa")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"{path}: vision_feature_layer {layer!r} (several layers) is not supported; use one layer")
    vision = VisionTower(encoder, layer, use_cls=False)
    vision.use_cls = vision.has_cls_token and config.vision_feature_select_strategy == "full"
    model = assemble(vision, lm, tokenizer, "mlp", {"bias": getattr(config, "multimodal_projector_bias", True)})
    if model.image_token_id != config.image_token_id:
        raise ValueError(f"{path}: the tokenizer's <image> id {model.image_token_id} differs from config.image_token_id {config.image_token_id}")
    load_weights(model, renamed_state(path, model), source=path)
    return model.eval(), tokenizer


def renamed_state(path: Path, model: MultimodalLM) -> dict[str, torch.Tensor]:
    """transformers' Llava names -> this model's names. Folders saved by transformers 5 use the
    original checkpoint layout (`language_model.model.`); in-memory names (`model.language_model.`)
    appear in folders written by 4.5x: both are read."""
    decoder = _name_of(model.lm, model.lm.get_decoder())
    head = _name_of(model.lm, model.lm.get_output_embeddings())
    prefixes = {
        "model.vision_tower.": "vision.encoder.",
        "vision_tower.": "vision.encoder.",
        "model.multi_modal_projector.": "connector.",
        "multi_modal_projector.": "connector.",
        "model.language_model.": f"lm.{decoder}.",
        "language_model.model.": f"lm.{decoder}.",
        "language_model.lm_head.": f"lm.{head}.",
        "lm_head.": f"lm.{head}.",
    }
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        for key, value in load_file(str(file)).items():
            old = next((p for p in prefixes if key.startswith(p)), None)
            if old is None:
                raise ValueError(f"{file}: unexpected weight {key} for a Llava folder")
            state[prefixes[old] + key[len(old) :]] = value
    if getattr(model.lm.config, "tie_word_embeddings", False):
        state.setdefault(f"lm.{head}.weight", state[f"lm.{decoder}.embed_tokens.weight"])
    return stacked_experts(state)


EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def stacked_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 saves stacked experts (Qwen2-MoE style, `experts.gate_up_proj [E, 2I, H]`, `experts.down_proj
    [E, H, I]`) in the original one-module-per-expert layout (`experts.{e}.gate_proj.weight`, ...): stack them back,
    as its own loading does."""
    per_expert: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key in [k for k in state if EXPERT.fullmatch(k)]:
        prefix, expert, proj = EXPERT.fullmatch(key).groups()
        per_expert.setdefault(prefix, {}).setdefault(proj, {})[int(expert)] = state.pop(key)
    for prefix, projs in per_expert.items():
        ordered = {proj: [weights[e] for e in sorted(weights)] for proj, weights in projs.items()}
        state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(ordered["gate_proj"], ordered["up_proj"])])
        state[f"{prefix}.down_proj"] = torch.stack(ordered["down_proj"])
    return state


def _name_of(parent: torch.nn.Module, child: torch.nn.Module) -> str:
    return next(name for name, module in parent.named_modules() if module is child)
