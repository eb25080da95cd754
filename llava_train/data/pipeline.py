"""Wire a recipe's data section into loaders: template + image processor + shards + collate."""

from __future__ import annotations

from functools import partial

from llava_train.data.collate import collate
from llava_train.data.encode import SampleEncoder
from llava_train.data.images import ImageProcessor
from llava_train.data.shards import ShardStream, build_loader, expand_urls
from llava_train.data.templates import get_template
from llava_train.recipe import DataConfig


def make_encoder(data: DataConfig, tokenizer, model) -> SampleEncoder:
    template = get_template(data.template, tokenizer, data.system_prompt)
    images = ImageProcessor.from_vision_config(model.vision.config, mode=data.image_mode)
    return SampleEncoder(template, images, model.tokens_per_image, data.max_length)


def make_collate(tokenizer, model):
    return partial(collate, pad_token_id=tokenizer.pad_token_id, image_token_id=model.image_token_id)


def check_data_paths(data: DataConfig) -> None:
    """Fail before any model is built when a shard pattern matches nothing."""
    expand_urls(data.train)
    if data.eval:
        expand_urls(data.eval)


def train_loader(data: DataConfig, encoder, collate_fn, batch_size: int, seed: int, rank: int, world_size: int):
    stream = ShardStream(
        expand_urls(data.train), encoder, seed=seed, shuffle=data.shuffle, rank=rank, world_size=world_size
    )
    return build_loader(stream, batch_size, collate_fn, num_workers=data.num_workers)


def eval_loader(data: DataConfig, encoder, collate_fn, batch_size: int, rank: int, world_size: int):
    if not data.eval:
        return None
    stream = ShardStream(
        expand_urls(data.eval), encoder, seed=0, shuffle=False, rank=rank, world_size=world_size, loop=False
    )
    return build_loader(stream, batch_size, collate_fn, num_workers=0)
