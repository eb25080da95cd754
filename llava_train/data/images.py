"""Image decoding and preprocessing with PIL and numpy only (no torchvision).

`resize` reproduces CLIPImageProcessor: shortest edge to `shortest_edge` (bicubic),
centre crop to `size`, rescale by 1/255, normalise; with `square` the image goes
straight to `size` x `size` (SiglipImageProcessor). `pad` is LLaVA-1.5's expand2square:
pad to a square with the mean colour first, so nothing is cropped away, then resize
(transformers' LlavaImageProcessor with `do_pad`). A pretrained tower folder's own
`preprocessor_config.json` sets size, mean/std, resize/crop and resampling.
"""

from __future__ import annotations

import io
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
PROCESSOR_FILE = "preprocessor_config.json"  # a tower folder's image settings (transformers)


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes now, so a corrupt file fails here as a skippable sample."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise BadSample("undecodable image", f"{type(err).__name__}: {err}") from None
    return image


class ImageProcessor:
    def __init__(
        self,
        size: int,
        mean: tuple,
        std: tuple,
        mode: Literal["resize", "pad"] = "pad",
        shortest_edge: int | None = None,
        square: bool = False,
        resample: int = Image.Resampling.BICUBIC,
    ):
        """`shortest_edge` (default `size`) is what the image's short side is resized to before
        the centre crop to `size`; `square` resizes straight to `size` x `size` instead."""
        if mode not in ("resize", "pad"):
            raise ValueError(f"image mode must be 'resize' or 'pad', got {mode!r} (see data.image_mode)")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.mode = mode
        self.shortest_edge = self.size if shortest_edge is None or square else int(shortest_edge)
        if self.shortest_edge < self.size:
            raise ValueError(f"a shortest edge of {self.shortest_edge} is too small to crop {self.size} from")
        self.square = square
        self.resample = Image.Resampling(int(resample))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> float32 [3, size, size]."""
        image = image.convert("RGB")
        if self.mode == "pad":
            image = self._expand_to_square(image)
        image = self._resize(image)
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

    def _resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.square:
            target = (self.size, self.size)
        else:
            short, long = min(width, height), max(width, height)
            new_long = int(self.shortest_edge * long / short)  # int() truncation, as transformers does
            target = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
        if target == (width, height):
            return image
        return image.resize(target, resample=self.resample)

    def _centre_crop(self, pixels: np.ndarray) -> np.ndarray:
        height, width = pixels.shape[:2]
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return pixels[top : top + self.size, left : left + self.size]

    def hf_kwargs(self) -> dict:
        """Arguments of transformers' LlavaImageProcessor that reproduce this processor."""
        side = {"height": self.size, "width": self.size}
        return {
            "size": side if self.square else {"shortest_edge": self.shortest_edge},
            "crop_size": side,
            "do_center_crop": True,
            "do_pad": self.mode == "pad",
            "resample": int(self.resample),
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `preprocessor_config.json` (a LlavaImageProcessor) that `from_vision_config` reads back."""
        from transformers import LlavaImageProcessorPil

        LlavaImageProcessorPil(**self.hf_kwargs()).save_pretrained(str(folder))

    @classmethod
    def from_vision_config(cls, vision_hf_config, mode: str = "pad", local_path: str | Path | None = None):
        """Size from the tower's config; the rest from `local_path`'s preprocessor_config.json
        if there is one, else the defaults of the tower's family (SigLIP: 0.5 mean/std and a
        square resize; otherwise CLIP's). The pad/resize mode is always the caller's
        (`data.image_mode`), whatever the folder says."""
        size = _config_value(vision_hf_config, "image_size")
        if size is None:
            raise ValueError(
                "the vision config has no `image_size`; set it in model.vision.config (or in the tower folder's "
                "config.json)"
            )
        if local_path is not None and (Path(local_path) / PROCESSOR_FILE).is_file():
            return cls.from_folder(local_path, size, mode)
        if "siglip" in str(_config_value(vision_hf_config, "model_type") or ""):
            return cls(size, SIGLIP_MEAN, SIGLIP_STD, mode, square=True)
        return cls(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode)

    @classmethod
    def from_folder(cls, folder: str | Path, size: int, mode: str = "pad"):
        """The settings of a folder's preprocessor_config.json, read by transformers (which fills in
        its class's defaults), for a tower that takes `size` x `size` images."""
        from transformers import AutoImageProcessor

        path = Path(folder) / PROCESSOR_FILE
        try:
            hf = AutoImageProcessor.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError) as err:
            reason = str(err)[:160]  # transformers lists every known processor type after this
            raise ValueError(f"transformers cannot read {path} ({reason}...); fix or remove the file") from None
        resize = _as_dict(getattr(hf, "size", None))
        crop = _as_dict(getattr(hf, "crop_size", None)) if getattr(hf, "do_center_crop", False) else {}
        shortest_edge = resize.get("shortest_edge")
        if shortest_edge is None and resize.get("height") != resize.get("width"):
            raise ValueError(f"{path}: resizing to {resize} is not square; the tower takes {size}x{size} images")
        out = crop.get("height") or shortest_edge or resize.get("height")
        if out != size or crop.get("height", size) != crop.get("width", size):
            raise ValueError(
                f"{path} makes {out}-pixel images (size {resize}, crop {crop or 'off'}) but the tower's config has "
                f"image_size {size}; make them agree (edit the file or the tower's config)"
            )
        normalise = getattr(hf, "do_normalize", True)
        mean = hf.image_mean if normalise else (0.0, 0.0, 0.0)
        std = hf.image_std if normalise else (1.0, 1.0, 1.0)
        resample = getattr(hf, "resample", None)
        resample = Image.Resampling.BICUBIC if resample is None else int(resample)
        return cls(size, mean, std, mode, shortest_edge, square=shortest_edge is None, resample=resample)



def _config_value(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _as_dict(size) -> dict:
    """transformers' SizeDict / dict / int -> {key: value} of the keys that are set."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"shortest_edge": size}
    items = size.items() if isinstance(size, dict) else vars(size).items()
    return {key: value for key, value in items if value is not None}
