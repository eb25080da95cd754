"""Export a checkpoint into a Hugging Face `LlavaForConditionalGeneration` folder.

The mlp connector's parameters already carry transformers' projector names, and the
tower and LM are plain HF modules, so export copies module state dicts; no key renaming.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessorPil, LlavaProcessor

from llava_train.data.chat_template import jinja_chat_template, renders_training_ids
from llava_train.data.templates import get_template
from llava_train.model.io import load_model_files, model_files_dir
from llava_train.modules.attach import merge_module
from llava_train.model.mllm import MultimodalLM
from llava_train.model.prompting import checkpoint_prompting

log = logging.getLogger(__name__)

SUPPORTED_TOWERS = ("clip_vision_model", "siglip_vision_model")


def to_hf_llava(model: MultimodalLM) -> LlavaForConditionalGeneration:
    check_exportable(model)
    vision_cfg, text_cfg = model.vision.config, model.lm.config
    config = LlavaConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_id=model.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=model.vision.feature_layer,
        # "default" drops the first (CLS) token; towers without CLS keep every patch.
        vision_feature_select_strategy="default" if model.vision.has_cls_token and not model.vision.use_cls else "full",
        image_seq_length=model.tokens_per_image,
        multimodal_projector_bias=model.connector.linear_1.bias is not None,
        tie_word_embeddings=getattr(text_cfg, "tie_word_embeddings", False),
    )
    hf = LlavaForConditionalGeneration(config).eval()
    hf.model.vision_tower.load_state_dict(model.vision.encoder.state_dict())
    hf.model.multi_modal_projector.load_state_dict(model.connector.state_dict())
    hf.model.language_model.load_state_dict(model.lm.get_decoder().state_dict())
    hf.lm_head.load_state_dict(model.lm.get_output_embeddings().state_dict())
    return hf


def check_exportable(model: MultimodalLM) -> None:
    tower = model.vision.config.model_type
    if tower not in SUPPORTED_TOWERS:
        raise ValueError(f"export supports vision towers {SUPPORTED_TOWERS}; this one is `{tower}`")
    if type(model.connector).__name__ != "MLPConnector":
        raise ValueError(
            f"export to transformers' Llava needs the `mlp` connector; this model uses {type(model.connector).__name__}"
        )


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, keep_lora: bool = False) -> Path:
    """Write `out_dir` loadable by `LlavaForConditionalGeneration.from_pretrained` (safetensors).

    The processor carries the training prompt layout (a Jinja chat template derived from the
    recipe's template), the image preprocessing and, in generation_config.json, the template's
    end-of-turn tokens, so `pipeline("image-text-to-text", model=out_dir)` answers as
    `llava-train generate` does. LoRA adapters are merged into the LM, unless `keep_lora`: then
    `out_dir` holds the base weights and `out_dir/adapter/` a peft adapter addressed to the
    exported Llava's module names (`PeftModel.from_pretrained(llava, out_dir / "adapter")`).
    """
    model, tokenizer = load_model_files(checkpoint, merge=not keep_lora)
    how = checkpoint_prompting(checkpoint, model.vision.config)
    if how.images is None:
        raise ValueError(
            f"{checkpoint} was trained with data.image_mode {how.image_mode}; transformers' Llava takes one "
            "tile per image, so export supports the resize and pad modes only"
        )
    template = get_template(how.template, tokenizer, how.system_prompt)
    chat_template = jinja_chat_template(template)
    if not renders_training_ids(template, chat_template, model.tokens_per_image):
        log.warning(
            "the exported chat template renders prompts that this tokenizer splits into other tokens than "
            "training did (template %s); transformers users will prompt the model slightly off its training "
            "distribution, while `llava-train generate` prompts it exactly",
            template.name,
        )
    out_dir = Path(out_dir)
    if not modules_fold_away(model):
        return export_llava_train_format(checkpoint, model, out_dir)
    if keep_lora and hasattr(model.lm, "peft_config"):
        model.lm = save_adapter_for_llava(model.lm, out_dir / "adapter", base_path=out_dir)
    hf = to_hf_llava(model)
    hf.generation_config.eos_token_id = template.stop_token_ids
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    hf.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.chat_template = chat_template  # also for text-only users of the tokenizer
    tokenizer.save_pretrained(out_dir)
    LlavaProcessor(
        image_processor=LlavaImageProcessorPil(**how.images.hf_kwargs()),
        tokenizer=tokenizer,
        patch_size=model.vision.config.patch_size,
        vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
        num_additional_image_tokens=int(model.vision.has_cls_token),
        chat_template=chat_template,
    ).save_pretrained(out_dir)
    return out_dir


def modules_fold_away(model: MultimodalLM) -> bool:
    """Merge the attached modules that declare `merge` and convert the LM for those that declare
    `convert` (where its transformers class can represent it); False when one must stay (`keep`, or a
    conversion that does not fit), in which case transformers' Llava cannot hold the model. A `refuse`
    module stops the export."""
    refused = [m.name for m in model.attachments if m.export == "refuse"]
    if refused:
        raise ValueError(f"module {refused[0]} declares that it cannot be exported; use the checkpoint itself")
    for module in [m for m in model.attachments if m.export == "merge"]:
        merge_module(model, module)
    for module in [m for m in model.attachments if m.export == "convert"]:
        try:
            lm = module.convert_lm(model.lm)
        except ValueError as why:
            log.warning("module %s stays in the llava_train format: %s", module.name, why)
            continue
        model.lm = lm
        model.attachments.remove(module)
    return not model.attachments


def export_llava_train_format(checkpoint: str | Path, model: MultimodalLM, out_dir: Path) -> Path:
    kept = ", ".join(m.name for m in model.attachments)
    shutil.copytree(model_files_dir(checkpoint), out_dir, dirs_exist_ok=True)
    log.warning(
        "transformers' LlavaForConditionalGeneration cannot hold module(s) %s: %s holds the llava_train format "
        "instead (load it with `llava-train generate` / `llava_train.model.io.load_model_files`)", kept, out_dir
    )
    return out_dir


def save_adapter_for_llava(peft_lm, adapter_dir: Path, base_path: Path):
    """Save the LM's LoRA adapter renamed into the exported Llava's module tree; return the bare LM.

    In llava_train the adapter sits on a causal LM (`model.layers...`); in transformers' Llava the
    same layers live under `model.language_model.layers...`, so target names and weight keys move.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    decoder_name = _child_name(peft_lm.get_base_model(), peft_lm.get_base_model().get_decoder())
    rename = lambda name: name.replace(f"{decoder_name}.", "model.language_model.", 1)  # noqa: E731
    config = copy.deepcopy(peft_lm.peft_config["default"])
    config.target_modules = sorted(rename(name) for name in config.target_modules)
    config.base_model_name_or_path = str(base_path)
    state = get_peft_model_state_dict(peft_lm)
    prefix = "base_model.model."
    renamed = {prefix + rename(key[len(prefix) :]): value.contiguous() for key, value in state.items()}
    adapter_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(adapter_dir)
    save_file(renamed, str(adapter_dir / "adapter_model.safetensors"))
    return peft_lm.unload()  # base weights without the adapters' contribution


def _child_name(parent: torch.nn.Module, child: torch.nn.Module) -> str:
    for name, module in parent.named_children():
        if module is child:
            return name
    raise ValueError(f"{type(child).__name__} is not a direct child of {type(parent).__name__}")
