"""Image preprocessing matches transformers' CLIP processor; pad mode pads with the mean colour."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, SiglipVisionConfig
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from llava_train.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, BadSample, ImageProcessor, decode_image
from tests.conftest import TINY_LM, TINY_VISION


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
    assert not clip.square
    siglip = ImageProcessor.from_vision_config(SiglipVisionConfig(image_size=32), mode="resize")
    assert siglip.mean == (0.5, 0.5, 0.5) and siglip.std == (0.5, 0.5, 0.5) and siglip.square
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32, image_mean=[0.1] * 3, image_std=[0.2] * 3).save_pretrained(
        tmp_path
    )
    local = ImageProcessor.from_vision_config({"model_type": "clip_vision_model", "image_size": 32}, "pad", tmp_path)
    assert local.mean == (0.1,) * 3 and local.std == (0.2,) * 3
    with pytest.raises(ValueError, match="image_mode"):
        ImageProcessor(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="stretch")
    # The fix it names is a key the recipe has (there is no model.vision.image_size).
    with pytest.raises(ValueError, match=r"no `image_size`; set it in model\.vision\.config"):
        ImageProcessor.from_vision_config({"model_type": "clip_vision_model"})


@pytest.mark.parametrize("width,height", [(70, 50), (50, 70)])
def test_pad_mode_matches_llava_image_processor(width, height):
    """transformers' LlavaImageProcessor with do_pad is LLaVA-1.5's pad-to-square too (what export writes)."""
    ours = ImageProcessor(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="pad")
    reference = LlavaImageProcessorPil(**ours.hf_kwargs())
    image = random_image(width, height)
    torch.testing.assert_close(ours(image), reference(image, return_tensors="pt")["pixel_values"][0], atol=1e-5, rtol=0)


def test_square_resize_matches_siglip_image_processor():
    reference = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ours = ImageProcessor.from_vision_config(SiglipVisionConfig(image_size=32), mode="resize")
    image = random_image(70, 50)
    torch.testing.assert_close(ours(image), reference(image, return_tensors="pt")["pixel_values"][0], atol=1e-5, rtol=0)


@pytest.fixture
def tower_folder(tmp_path):
    """A saved tiny CLIP tower whose processor differs from CLIP's defaults in every setting read."""
    from transformers import CLIPVisionModel

    vision = {k: v for k, v in TINY_VISION.items() if k != "model_type"}
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(tmp_path / "tower")
    CLIPImageProcessor(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.2, 0.3, 0.4],
        image_std=[0.5, 0.4, 0.3],
        resample=Image.Resampling.BILINEAR,
    ).save_pretrained(tmp_path / "tower")
    return tmp_path / "tower"


def test_a_pretrained_towers_own_processor_settings_are_used(tower_folder, tokenizer_dir):
    from llava_train.data.pipeline import make_encoder
    from llava_train.model.build import build_model, load_tokenizer
    from llava_train.recipe import DataConfig, ModelConfig

    tokenizer = load_tokenizer(str(tokenizer_dir))
    cfg = ModelConfig(vision={"path": str(tower_folder)}, lm={"config": TINY_LM}, tokenizer=str(tokenizer_dir))
    model = build_model(cfg, tokenizer)
    encoder = make_encoder(DataConfig(train=["x"], image_mode="resize"), tokenizer, model, cfg.vision.path)
    image = random_image(90, 60)
    expected = CLIPImageProcessorPil.from_pretrained(tower_folder)(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(encoder.image_processor(image), expected, atol=1e-5, rtol=0)
    family_default = ImageProcessor.from_vision_config(model.vision.config, "resize")
    assert not torch.allclose(family_default(image), expected, atol=1e-2)  # the folder's settings mattered


@pytest.mark.parametrize("square", [False, True])
def test_saved_settings_read_back_equal(tmp_path, square):
    saved = ImageProcessor(32, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1), "resize", 36, square, Image.Resampling.LANCZOS)
    saved.save_pretrained(tmp_path)
    read = ImageProcessor.from_vision_config(CLIPVisionConfig(image_size=32), "pad", tmp_path)
    assert vars(read) == {**vars(saved), "mode": "pad"}  # the mode is the recipe's, not the folder's


def test_a_folder_at_another_size_than_the_tower_is_refused(tmp_path):
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size=48).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="makes 48-pixel images .* image_size 32"):
        ImageProcessor.from_vision_config(CLIPVisionConfig(image_size=32), "pad", tmp_path)


def test_decode_image_reports_undecodable_bytes():
    buffer = io.BytesIO()
    random_image(8, 8).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).size == (8, 8)
    with pytest.raises(BadSample, match="^undecodable image: ") as caught:
        decode_image(b"not an image at all")
    assert caught.value.reason == "undecodable image"
    with pytest.raises(BadSample):
        decode_image(buffer.getvalue()[:40])  # truncated PNG
