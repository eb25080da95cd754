"""How a checkpoint expects to be prompted: its template, system prompt and image preprocessing.

`llava-train generate` and `llava-train export` both read these, so the CLI and the exported
transformers model see the prompt and the pixels the model was trained on. Sources, first
found wins: the model files (template and system prompt in their meta, the image settings
in `model/vision/preprocessor_config.json`, written by the trainer), then the checkpoint's
recipe.yaml (checkpoints written before these were recorded; the tower folder it names),
then the defaults (vicuna_v1, pad, the tower family's statistics).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from llava_train.data.images import PROCESSOR_FILE, ImageProcessor
from llava_train.model.io import META, model_files_dir


@dataclass(frozen=True)
class Prompting:
    template: str
    system_prompt: str | None
    image_mode: str  # data.image_mode: resize | pad | anyres
    images: ImageProcessor | None  # None for anyres, whose tiling a single-image processor cannot do


def checkpoint_prompting(checkpoint: str | Path, vision_config) -> Prompting:
    folder = model_files_dir(checkpoint)
    meta = json.loads((folder / META).read_text())
    recipe = _recipe(Path(checkpoint), folder)
    data = recipe.get("data") or {}
    recorded = meta.get("template") is not None  # older model files lack it
    template = meta["template"] if recorded else data.get("template")
    system_prompt = meta.get("system_prompt") if recorded else data.get("system_prompt")
    mode = data.get("image_mode") or "pad"
    images = None
    if mode != "anyres":
        images = ImageProcessor.from_vision_config(vision_config, mode, _processor_folder(folder, recipe))
    return Prompting(template or "vicuna_v1", system_prompt, mode, images)


def _recipe(checkpoint: Path, model_folder: Path) -> dict:
    for path in (checkpoint / "recipe.yaml", model_folder.parent / "recipe.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def _processor_folder(model_folder: Path, recipe: dict) -> Path | None:
    """The checkpoint's own copy of the training image settings, else the recipe's tower folder."""
    if (model_folder / "vision" / PROCESSOR_FILE).is_file():
        return model_folder / "vision"
    tower = ((recipe.get("model") or {}).get("vision") or {}).get("path")
    return Path(tower) if tower else None
