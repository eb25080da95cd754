"""Image decoding and preprocessing with PIL and numpy only (no torchvision).

`resize` reproduces CLIPImageProcessor: shortest edge to `size` (bicubic), centre
crop, rescale by 1/255, normalise. `pad` is LLaVA-1.5's expand2square: pad to a
square with the mean colour first, so nothing is cropped away, then resize.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from llava_train.data.errors import BadSample

__all__ = ["BadSample", "ImageProcessor", "decode_image", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes now, so a corrupt file fails here as a skippable sample."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise BadSample("undecodable image", f"{type(err).__name__}: {err}") from None
    return image


class ImageProcessor:
    def __init__(self, size: int, mean: tuple, std: tuple, mode: Literal["resize", "pad"] = "pad"):
        if mode not in ("resize", "pad"):
            raise ValueError(f"image mode must be 'resize' or 'pad', got {mode!r} (see data.image_mode)")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.mode = mode

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> float32 [3, size, size]."""
        image = image.convert("RGB")
        if self.mode == "pad":
            image = self._expand_to_square(image)
        image = self._resize_shortest_edge(image)
        pixels = self._centre_crop(np.asarray(image))
        pixels = pixels.astype(np.float32) * np.float32(1 / 255)
        pixels = (pixels - np.float32(self.mean)) / np.float32(self.std)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def _expand_to_square(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        fill = tuple(int(m * 255) for m in self.mean)  # LLaVA-1.5 pads with the (truncated) mean colour
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        return square

    def _resize_shortest_edge(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)  # int() truncation, as transformers does
        target = (self.size, new_long) if width <= height else (new_long, self.size)
        if target == (width, height):
            return image
        return image.resize(target, resample=Image.Resampling.BICUBIC)

    def _centre_crop(self, pixels: np.ndarray) -> np.ndarray:
        height, width = pixels.shape[:2]
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return pixels[top : top + self.size, left : left + self.size]

    @classmethod
    def from_vision_config(cls, vision_hf_config, mode: str = "pad", local_path: str | Path | None = None):
        """Size from the tower's config; mean/std from a local preprocessor_config.json if
        there is one, else the defaults of the tower's family (SigLIP 0.5, otherwise CLIP)."""
        size = _config_value(vision_hf_config, "image_size")
        if size is None:
            raise ValueError(
                "the vision config has no `image_size`; set it in model.vision.config (or in the tower folder's "
                "config.json)"
            )
        model_type = str(_config_value(vision_hf_config, "model_type") or "")
        mean, std = (SIGLIP_MEAN, SIGLIP_STD) if "siglip" in model_type else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        if local_path is not None:
            mean, std = _read_mean_std(Path(local_path) / "preprocessor_config.json", mean, std)
        return cls(size, mean, std, mode)


def _config_value(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _read_mean_std(path: Path, mean: tuple, std: tuple) -> tuple[tuple, tuple]:
    if not path.is_file():
        return mean, std
    saved = json.loads(path.read_text())
    return tuple(saved.get("image_mean", mean)), tuple(saved.get("image_std", std))
