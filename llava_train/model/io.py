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

from llava_train.model.build import assemble, build_language_model, load_tokenizer
from llava_train.model.lora import add_lora, merge_lora_state, saved_lora_config
from llava_train.model.mllm import MultimodalLM
from llava_train.model.vision import VisionTower
from llava_train.model.zero3 import partitioned_loading
from llava_train.modules.attach import attach_modules, merge_module, module_specs
from llava_train.modules.base import build_module
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
        "modules": module_specs(model),  # re-attached before the weights load (export, generate, init_from)
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


def load_model_files(
    checkpoint: str | Path, merge: bool = True, zero3_config: dict | None = None
) -> tuple[MultimodalLM, object]:
    """Rebuild the model from a checkpoint's model files, with its modules re-attached.

    LoRA adapters are merged into the base weights unless `merge=False`. With `zero3_config`
    the tower and LM are built straight into ZeRO-3 partitions (a frozen teacher or reference).
    """
    folder = model_files_dir(checkpoint)
    meta = read_meta(folder)
    tokenizer = load_tokenizer(str(folder / "tokenizer"))
    with partitioned_loading(zero3_config):
        encoder = _encoder_from_config(AutoConfig.from_pretrained(folder / "vision"))
        lm = build_language_model(None, AutoConfig.from_pretrained(folder / "lm"), "sdpa")
    vision = VisionTower(encoder, meta["feature_layer"], meta["use_cls"])
    model = assemble(vision, lm, tokenizer, meta["connector"]["type"], meta["connector"].get("options", {}))
    attach_modules(model, meta.get("modules", []))
    state = load_file(str(folder / WEIGHTS))
    lora = saved_lora_config(meta)
    if lora is not None and merge:
        state = merge_lora_state(state, lora)
    elif lora is not None:
        model.lm = add_lora(model.lm, lora)
    load_weights(model, state, source=folder / WEIGHTS)
    return model.eval(), tokenizer


def load_any(path: str | Path, zero3_config: dict | None = None) -> tuple[MultimodalLM, object]:
    """A llava_train checkpoint (LoRA merged) or an exported transformers Llava folder."""
    from llava_train.model.hf_import import is_hf_llava_folder, load_hf_llava

    if is_hf_llava_folder(path):
        return load_hf_llava(path, zero3_config)
    if not (Path(path) / META).is_file() and not (Path(path) / "model" / META).is_file():
        raise FileNotFoundError(
            f"{path} is neither a llava_train checkpoint (RUN/checkpoints/step-N with model/{META}) nor an "
            "exported transformers Llava folder (config.json with model_type llava)"
        )
    return load_model_files(path, merge=True, zero3_config=zero3_config)


def _encoder_from_config(config) -> torch.nn.Module:
    from transformers import AutoModel

    return AutoModel.from_config(config, attn_implementation="sdpa")


def read_meta(checkpoint: str | Path) -> dict:
    return json.loads((model_files_dir(checkpoint) / META).read_text())


def initialise_from(
    model: MultimodalLM, checkpoint: str | Path, stage_lora: LoraConfig | None, recipe_modules: list[dict] = ()
) -> str:
    """Load an earlier stage's weights into `model` (built plain, before the stage is applied).

    The checkpoint's modules are attached first. One the recipe lists again must have the same
    options; one it does not list is merged into plain weights where its export policy allows,
    else kept. LoRA adapters are continued when this stage trains the same adapters (`stage_lora`
    equal to the saved config), otherwise folded into the base weights. Returns a sentence for
    the log saying what happened.
    """
    folder = model_files_dir(checkpoint)
    meta = read_meta(folder)
    saved_modules = meta.get("modules", [])
    _check_same_module_options(saved_modules, recipe_modules, checkpoint)
    carried = attach_modules(model, saved_modules)
    saved = saved_lora_config(meta)
    state = load_file(str(folder / WEIGHTS))
    if saved is None:
        how = ["full weights"]
    elif stage_lora is not None and saved == stage_lora:
        model.lm = add_lora(model.lm, saved)
        how = ["its LoRA adapters continue training"]
    else:
        state = merge_lora_state(state, saved)
        how = ["its LoRA adapters merged into the base weights"]
        if stage_lora is not None:
            how[-1] += " (this stage adds fresh adapters: its stage.lora differs)"
    load_weights(model, state, source=folder / WEIGHTS)
    listed = {spec["type"] for spec in recipe_modules}
    for module in carried:
        if module.name in listed:
            how.append(f"module {module.name} continues")
        elif module.export == "merge":
            merge_module(model, module)
            how.append(f"module {module.name} merged into the base weights")
        else:
            how.append(f"module {module.name} kept (it cannot be merged; list it in `modules` to set its options)")
    return f"initialised from {checkpoint}: " + "; ".join(how)


def _check_same_module_options(saved: list[dict], listed: list[dict], checkpoint) -> None:
    for spec in listed:
        before = next((s for s in saved if s["type"] == spec["type"]), None)
        if before is None:
            continue
        options = build_module(spec).spec()
        if options != before:
            changed = sorted(k for k in options if options.get(k) != before.get(k))
            raise ValueError(
                f"stage.init_from {checkpoint} has module {spec['type']} with other options ({', '.join(changed)}); "
                "use the checkpoint's options (its model/llava_train_model.json) or start the module fresh from a "
                "checkpoint without it"
            )


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path = "<state>") -> None:
    """Load a consolidated state dict, naming any shape mismatch or missing key.

    Parameters already partitioned by ZeRO-3 (a pretrained part built under zero.Init) are
    gathered one at a time, written on rank 0 and re-partitioned.
    """
    state = dict(state)
    params = dict(model.named_parameters())
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in params.items()}
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers()})
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {shapes[k]}"
        for k, v in state.items()
        if k in shapes and shapes[k] != tuple(v.shape)
    ]
    if mismatched:
        raise ValueError(f"{source} does not fit this model's shapes: " + "; ".join(mismatched[:5]))
    own_keys = set(model.state_dict())
    missing = sorted(own_keys - set(state))
    unexpected = sorted(set(state) - own_keys)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
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
