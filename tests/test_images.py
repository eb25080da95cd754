"""Image preprocessing matches transformers' CLIP processor; pad mode pads with the mean colour."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, SiglipVisionConfig

from llava_train.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, BadSample, ImageProcessor, decode_image


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("width,height,size", [(70, 50, 32), (50, 70, 32), (300, 200, 224), (64, 64, 64)])
def test_resize_mode_matches_clip_image_processor(width, height, size):
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Reference
    except ImportError:  # older transformers: the slow processor is PIL-based already
        from transformers import CLIPImageProcessor as Reference
    logging.getLogger("transformers").setLevel(logging.ERROR)
    reference = Reference(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image = random_image(width, height)
    expected = reference(image, return_tensors="pt")["pixel_values"][0]
    ours = ImageProcessor(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="resize")(image)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_pad_mode_pads_with_the_mean_colour():
    processor = ImageProcessor(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="pad")
    wide_black = Image.new("RGB", (64, 16), (0, 0, 0))
    out = processor(wide_black)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None], torch.tensor(OPENAI_CLIP_STD)[:, None]
    fill = (torch.tensor([int(m * 255) for m in OPENAI_CLIP_MEAN])[:, None] / 255 - mean) / std
    black = (0 - mean) / std
    torch.testing.assert_close(out[:, 0, :], fill.expand(3, 32), atol=1e-5, rtol=0)  # padded top rows
    torch.testing.assert_close(out[:, -1, :], fill.expand(3, 32), atol=1e-5, rtol=0)  # and bottom rows
    torch.testing.assert_close(out[:, 16, :], black.expand(3, 32), atol=1e-5, rtol=0)  # content in the middle
    # Nothing of a tall image is cropped away: its full height survives, centred.
    tall = processor(Image.new("RGB", (16, 64), (255, 255, 255)))
    white = (1 - mean) / std
    torch.testing.assert_close(tall[:, :, 16], white.expand(3, 32), atol=1e-5, rtol=0)


def test_any_mode_becomes_rgb():
    processor = ImageProcessor(16, (0.5,) * 3, (0.5,) * 3, mode="resize")
    for mode in ("L", "RGBA", "P"):
        assert processor(Image.new(mode, (20, 16))).shape == (3, 16, 16)


def test_from_vision_config_picks_size_and_statistics(tmp_path):
    clip = ImageProcessor.from_vision_config(CLIPVisionConfig(image_size=48), mode="pad")
    assert (clip.size, clip.mean, clip.std, clip.mode) == (48, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "pad")
    siglip = ImageProcessor.from_vision_config(SiglipVisionConfig(image_size=32), mode="resize")
    assert siglip.mean == (0.5, 0.5, 0.5) and siglip.std == (0.5, 0.5, 0.5)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1] * 3, "image_std": [0.2] * 3}))
    local = ImageProcessor.from_vision_config({"model_type": "clip_vision_model", "image_size": 32}, "pad", tmp_path)
    assert local.mean == (0.1,) * 3 and local.std == (0.2,) * 3
    with pytest.raises(ValueError, match="image_mode"):
        ImageProcessor(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="stretch")
    # The fix it names is a key the recipe has (there is no model.vision.image_size).
    with pytest.raises(ValueError, match=r"no `image_size`; set it in model\.vision\.config"):
        ImageProcessor.from_vision_config({"model_type": "clip_vision_model"})


def test_decode_image_reports_undecodable_bytes():
    buffer = io.BytesIO()
    random_image(8, 8).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).size == (8, 8)
    with pytest.raises(BadSample, match="^undecodable image: ") as caught:
        decode_image(b"not an image at all")
    assert caught.value.reason == "undecodable image"
    with pytest.raises(BadSample):
        decode_image(buffer.getvalue()[:40])  # truncated PNG
