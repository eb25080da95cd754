"""AnyRes tiling: grid choice, tile contents, placeholder expansion, truncation, and training through the model."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from llava_train.data import pipeline
from llava_train.data.anyres import DEFAULT_GRIDS, AnyResTiler, select_grid
from llava_train.data.batch import IGNORE_INDEX
from llava_train.data.collate import collate
from llava_train.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from llava_train.model.build import apply_stage, build_model, load_tokenizer
from llava_train.recipe import DataConfig, ModelConfig, StageConfig
from tests.conftest import TINY_LM, TINY_VISION

TILE = 32


@pytest.mark.parametrize(
    "size,grid",
    [
        ((640, 320), (1, 2)),  # 2:1 fills a 1x2 canvas exactly
        ((320, 640), (2, 1)),
        ((1000, 1000), (2, 2)),  # large square: 2x2 shows the most pixels
        ((960, 300), (1, 3)),  # panorama
        ((40, 20), (1, 2)),  # small: every grid shows all 800 pixels, 1x2 wastes the least canvas
        ((30, 30), (1, 2)),  # small square: 1x2 and 2x1 tie on both counts; the earlier grid wins
    ],
)
def test_select_grid_keeps_the_most_detail_then_wastes_the_least(size, grid):
    assert select_grid(*size, DEFAULT_GRIDS, TILE) == grid


def two_colour(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


@pytest.fixture(scope="module")
def processor():
    return ImageProcessor(TILE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="pad")


def test_tiles_cover_the_grid_and_the_thumbnail_comes_first(processor):
    tiler = AnyResTiler(processor, DEFAULT_GRIDS)
    image = two_colour(128, 64)
    images = tiler(image)
    assert tiler.num_images(image.size) == len(images) == 3  # 1x2 tiles + thumbnail
    assert all(t.shape == (3, TILE, TILE) for t in images)
    assert torch.equal(images[0], processor(image))
    red = processor(Image.new("RGB", (TILE, TILE), (255, 0, 0)))
    blue = processor(Image.new("RGB", (TILE, TILE), (0, 0, 255)))
    # bicubic resampling rings at the red/blue edge: compare away from it
    torch.testing.assert_close(images[1][..., :-2], red[..., :-2], atol=0.05, rtol=0)
    torch.testing.assert_close(images[2][..., 2:], blue[..., 2:], atol=0.05, rtol=0)
    # a non-fitting aspect ratio is padded with the mean colour, not stretched
    tall = AnyResTiler(processor, [(2, 1)])(Image.new("RGB", (60, 100), (255, 0, 0)))
    assert len(tall) == 3  # 60x100 -> 32x54 on the 32x64 canvas: 5 rows of padding on top
    assert float(tall[1][:, :5].abs().max()) < 0.05  # the mean colour normalises to ~0
    torch.testing.assert_close(tall[1][:, 8:], red[:, 8:], atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="anyres_grids"):
        AnyResTiler(processor, [(0, 2)])


# ----------------------------------------------------------------------------- encoder and model


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="module")
def model(tokenizer):
    cfg = ModelConfig(vision={"config": dict(TINY_VISION)}, lm={"config": dict(TINY_LM)}, tokenizer="unused")
    torch.manual_seed(0)
    built = build_model(cfg, tokenizer)
    apply_stage(built, StageConfig(name="sft"))
    return built


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def raw_sample(conversations, images: dict) -> dict:
    record = {"id": "x", "conversations": conversations, "images": list(images)}
    return {"__key__": "x", "__shard__": "s.tar", "json": record, **{k: png(v) for k, v in images.items()}}


def encoder_for(tokenizer, model, max_length=512):
    data = DataConfig(train=["unused"], image_mode="anyres", max_length=max_length)
    return pipeline.make_encoder(data, tokenizer, model)


QA = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "two colours"}]


def test_one_image_placeholder_becomes_a_span_per_tile_and_trains(tokenizer, model):
    encoder = encoder_for(tokenizer, model)
    assert encoder.tiler is not None and encoder.tiler.tile == TINY_VISION["image_size"]
    example = encoder(raw_sample(QA, {"png": two_colour(128, 64)}))
    per_image = model.tokens_per_image
    assert len(example.images) == 3
    assert example.input_ids.count(model.image_token_id) == 3 * per_image
    start = example.input_ids.index(model.image_token_id)
    assert example.input_ids[start : start + 3 * per_image] == [model.image_token_id] * (3 * per_image)

    text_only = encoder(raw_sample([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], {}))
    batch = collate([example, text_only], tokenizer.pad_token_id, model.image_token_id)
    assert batch.pixel_values.shape == (3, 3, 32, 32) and batch.image_sample_index.tolist() == [0, 0, 0]
    hidden = model(batch).hidden_states  # the mlp connector sees three separate images
    targets = batch.labels[:, 1:]
    supervised = hidden[:, :-1][targets != IGNORE_INDEX]
    loss = torch.nn.functional.cross_entropy(model.output_embeddings(supervised), targets[targets != IGNORE_INDEX])
    loss.backward()
    assert torch.isfinite(loss) and model.connector.linear_1.weight.grad.abs().sum() > 0


def test_truncation_drops_an_image_whose_tiles_were_cut(tokenizer, model):
    second = [{"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "one colour"}]
    raw = raw_sample(QA + second, {"0.png": two_colour(128, 64), "1.png": two_colour(64, 128)})
    full = encoder_for(tokenizer, model)(raw)
    assert len(full.images) == 6
    image_at = [i for i, t in enumerate(full.input_ids) if t == model.image_token_id]
    inside_second = image_at[4 * model.tokens_per_image]  # the second image's second span starts here
    cut = encoder_for(tokenizer, model, max_length=inside_second + 2)(raw)
    assert len(cut.images) == 3  # not 3 + 1 stray tile of the second image
    assert cut.input_ids.count(model.image_token_id) == 3 * model.tokens_per_image
    assert cut.input_ids[-1] != model.image_token_id
