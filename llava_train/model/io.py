"""Self-contained model files inside a checkpoint: consolidated weights, HF configs, tokenizer.

A checkpoint's `model/` folder rebuilds the model without the original recipe paths,
so `export`, `generate` and `init_from` work from the checkpoint alone. Under ZeRO-3
every parameter (the frozen vision tower too, which DeepSpeed#3090 lost) is gathered
one at a time onto rank 0 before writing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from llava_train.model.build import add_lora, assemble, build_language_model, load_tokenizer, merge_lora
from llava_train.model.mllm import MultimodalLM
from llava_train.model.vision import VisionTower
from llava_train.recipe import LoraConfig

WEIGHTS = "model.safetensors"
META = "llava_train_model.json"


def gathered_state_dict(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """A full fp32 CPU state dict on rank 0 (empty elsewhere), also under ZeRO-3 partitioning."""
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    state[name] = param.detach().float().cpu().clone()
        elif rank == 0:
            state[name] = param.detach().float().cpu().clone()
    if rank == 0:
        for name, buf in model.named_buffers():
            if buf is not None and _is_persistent(model, name):
                state[name] = buf.detach().cpu().clone()
    return state


def _is_persistent(model: torch.nn.Module, name: str) -> bool:
    module_name, _, buf_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buf_name not in module._non_persistent_buffers_set


def save_model_files(
    model: MultimodalLM,
    tokenizer,
    out_dir: Path,
    rank: int,
    lora: LoraConfig | None,
    connector: dict,
    template: str | None = None,
    system_prompt: str | None = None,
):
    """Write weights + configs + tokenizer into `out_dir` (rank 0 writes; all ranks must call).

    `template` and `system_prompt` are the recipe's `data.` fields: how generate and export prompt the model."""
    state = gathered_state_dict(model, rank)
    if rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / WEIGHTS))
    model.vision.config.save_pretrained(out_dir / "vision")
    model.lm.config.save_pretrained(out_dir / "lm")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    meta = {
        "feature_layer": model.vision.feature_layer,
        "use_cls": model.vision.use_cls,
        "connector": connector,
        "image_token_id": model.image_token_id,
        "lora": lora.model_dump() if lora is not None else None,
        "template": template,
        "system_prompt": system_prompt,
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2))


def model_files_dir(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    folder = checkpoint / "model" if (checkpoint / "model" / META).is_file() else checkpoint
    if not (folder / META).is_file():
        raise FileNotFoundError(
            f"{checkpoint} holds no llava_train model files ({META}); pass a checkpoint folder "
            "such as RUN/checkpoints/step-N"
        )
    return folder


def load_model_files(checkpoint: str | Path, merge: bool = True) -> tuple[MultimodalLM, object]:
    """Rebuild the model from a checkpoint's model files; LoRA adapters are merged unless `merge=False`."""
    folder = model_files_dir(checkpoint)
    meta = json.loads((folder / META).read_text())
    tokenizer = load_tokenizer(str(folder / "tokenizer"))
    vision_cfg = AutoConfig.from_pretrained(folder / "vision")
    encoder = _encoder_from_config(vision_cfg)
    vision = VisionTower(encoder, meta["feature_layer"], meta["use_cls"])
    lm = build_language_model(None, AutoConfig.from_pretrained(folder / "lm"), "sdpa")
    model = assemble(vision, lm, tokenizer, meta["connector"]["type"], meta["connector"].get("options", {}))
    if meta["lora"] is not None:
        model.lm = add_lora(model.lm, LoraConfig(**meta["lora"]))
    load_weights(model, folder / WEIGHTS)
    if merge:
        merge_lora(model)
    return model.eval(), tokenizer


def _encoder_from_config(config) -> torch.nn.Module:
    from transformers import AutoModel

    return AutoModel.from_config(config, attn_implementation="sdpa")


def load_weights(model: torch.nn.Module, path: Path, allow_missing_lora: bool = False) -> None:
    """Load a consolidated state dict, naming any shape mismatch or missing key.

    Parameters already partitioned by ZeRO-3 (a pretrained part built under zero.Init) are
    gathered one at a time, written on rank 0 and re-partitioned.
    """
    state = load_file(str(path))
    params = dict(model.named_parameters())
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in params.items()}
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers()})
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {shapes[k]}"
        for k, v in state.items()
        if k in shapes and shapes[k] != tuple(v.shape)
    ]
    if mismatched:
        raise ValueError(f"{path} does not fit this model's shapes: " + "; ".join(mismatched[:5]))
    own_keys = set(model.state_dict())
    missing = sorted(own_keys - set(state))
    unexpected = sorted(set(state) - own_keys)
    if allow_missing_lora:
        missing = [k for k in missing if "lora_" not in k]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(was it written by a model with another architecture?)"
        )
    partitioned = {k: state.pop(k) for k in list(state) if k in params and hasattr(params[k], "ds_id")}
    model.load_state_dict(state, strict=False)
    for name, value in partitioned.items():
        _copy_into_partitioned(params[name], value)


def _copy_into_partitioned(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
