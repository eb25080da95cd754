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
class Recorded:
    """What a checkpoint's files say about its prompt; None where they say nothing."""

    template: str | None
    system_prompt: str | None
    recipe: dict  # the checkpoint's recipe.yaml, {} when it has none (an exported Llava folder)

    @property
    def data(self) -> dict:
        return self.recipe.get("data") or {}


@dataclass(frozen=True)
class Prompting:
    template: str
    system_prompt: str | None
    image_mode: str  # data.image_mode: resize | pad | anyres
    images: ImageProcessor | None  # None for anyres, whose tiling a single-image processor cannot do


def recorded_prompting(checkpoint: str | Path) -> Recorded:
    """The template and system prompt from the model files' meta, else from the recipe (older
    model files lack them); `llava-train eval` reads this too, and adds its own checks."""
    checkpoint = Path(checkpoint)
    meta = _model_meta(checkpoint)
    recipe = _recipe(checkpoint)
    if meta.get("template") is not None:
        return Recorded(meta["template"], meta.get("system_prompt"), recipe)
    data = recipe.get("data") or {}
    return Recorded(data.get("template"), data.get("system_prompt"), recipe)


def checkpoint_prompting(checkpoint: str | Path, vision_config) -> Prompting:
    recorded = recorded_prompting(checkpoint)
    mode = recorded.data.get("image_mode") or "pad"
    images = None if mode == "anyres" else _recorded_images(checkpoint, recorded, vision_config)
    return Prompting(recorded.template or "vicuna_v1", recorded.system_prompt, mode, images)


def _recorded_images(checkpoint: str | Path, recorded: Recorded, vision_config) -> ImageProcessor:
    """The checkpoint's image settings (for anyres, those of its tiles: `pad`)."""
    mode = recorded.data.get("image_mode") or "pad"
    tower = _processor_folder(model_files_dir(checkpoint), recorded.recipe)
    return ImageProcessor.from_vision_config(vision_config, "pad" if mode == "anyres" else mode, tower)


def image_processor_of(path: str | Path, vision_config) -> ImageProcessor:
    """The image settings a llava_train checkpoint or an exported transformers Llava folder trained with
    (for anyres, those of its tiles)."""
    from llava_train.model.hf_import import is_hf_llava_folder

    if is_hf_llava_folder(path):  # an exported folder holds preprocessor_config.json beside config.json
        return ImageProcessor.from_vision_config(vision_config, "pad", local_path=path)
    return _recorded_images(path, recorded_prompting(path), vision_config)


def _model_meta(checkpoint: Path) -> dict:
    for candidate in (checkpoint / "model" / META, checkpoint / META):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def _recipe(checkpoint: Path) -> dict:
    """recipe.yaml beside the model files: in the step-N folder, else in the folder above."""
    for path in (checkpoint / "recipe.yaml", checkpoint.parent / "recipe.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def _processor_folder(model_folder: Path, recipe: dict) -> Path | None:
    """The checkpoint's own copy of the training image settings, else the recipe's tower folder."""
    if (model_folder / "vision" / PROCESSOR_FILE).is_file():
        return model_folder / "vision"
    tower = ((recipe.get("model") or {}).get("vision") or {}).get("path")
    return Path(tower) if tower else None
