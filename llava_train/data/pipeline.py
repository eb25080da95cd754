"""Wire a recipe's data section into loaders: sources + template + images + batching + collate."""

from __future__ import annotations

from functools import partial

from llava_train.data.anyres import AnyResTiler
from llava_train.data.batch_stream import BatchStream, VisualBudgets, loader_counters
from llava_train.data.batching import BatchingConfig
from llava_train.data.collate import collate_planned
from llava_train.data.encode import SampleEncoder
from llava_train.data.images import ImageProcessor
from llava_train.data.mixture import Source
from llava_train.data.shards import ShardStream, build_loader, expand_urls
from llava_train.data.templates import get_template
from llava_train.recipe import DataConfig


def make_encoder(
    data: DataConfig, tokenizer, model, vision_path: str | None = None, accept_groups: bool = False
) -> SampleEncoder:
    """`vision_path`: the tower's pretrained folder, whose preprocessor_config.json sets the image settings.
    `accept_groups`: the objective reads grouped samples (preference pairs); otherwise pair shards are refused."""
    template = get_template(data.template, tokenizer, data.system_prompt)
    anyres = data.image_mode == "anyres"
    # AnyRes tiles are exact tower-sized crops; its thumbnail is padded to a square like LLaVA-1.5's images.
    mode = "pad" if anyres else data.image_mode
    images = ImageProcessor.from_vision_config(model.vision.config, mode, local_path=vision_path)
    tiler = AnyResTiler(images, data.anyres_grids) if anyres else None
    visual = model.connector.visual_tokens()
    return SampleEncoder(template, images, visual, data.max_length, tiler, accept_groups=accept_groups)


def make_collate(tokenizer, model):
    """Collates BatchStream's micro-batches, expanding image spans for each one's visual budget."""
    return partial(collate_planned, pad_token_id=tokenizer.pad_token_id, image_token_id=model.image_token_id)


def train_sources(data: DataConfig) -> list[Source]:
    return [Source(s.name, tuple(expand_urls(s.paths)), s.weight) for s in data.sources]


def check_data_paths(data: DataConfig) -> None:
    """Fail before any model is built when a shard pattern matches nothing."""
    train_sources(data)
    if data.eval:
        expand_urls(data.eval)


def batching(data: DataConfig, micro_batch_size: int) -> BatchingConfig:
    return BatchingConfig(
        micro_batch_size=micro_batch_size,
        max_tokens_per_batch=data.max_tokens_per_batch,
        group_by_modality_length=data.group_by_modality_length,
        packing=data.packing,
        max_tokens_per_row=data.max_tokens_per_row or data.max_length,
        window=data.batching_window,
    )


def train_loader(
    data: DataConfig, encoder, collate_fn, batch_size: int, seed: int, rank: int, world_size: int, grad_accum: int = 1
):
    """Each micro-batch is planned for the visual budget drawn for the step it is consumed at."""
    stream = ShardStream(
        train_sources(data), encoder, seed=seed, shuffle=data.shuffle, rank=rank, world_size=world_size,
        max_bad_fraction=data.max_bad_fraction,
    )
    budgets = _budgets(encoder, grad_accum=grad_accum)
    return build_loader(BatchStream(stream, batching(data, batch_size), budgets), None, collate_fn, data.num_workers)


def eval_loader(data: DataConfig, encoder, collate_fn, batch_size: int, rank: int, world_size: int):
    if not data.eval:
        return None
    stream = ShardStream(
        expand_urls(data.eval), encoder, seed=0, shuffle=False, rank=rank, world_size=world_size, loop=False,
        max_bad_fraction=data.max_bad_fraction,
    )
    budgets = _budgets(encoder, draw=False)  # evaluation sees the connector's full count
    return build_loader(BatchStream(stream, batching(data, batch_size), budgets), None, collate_fn, num_workers=0)


def _budgets(encoder, **options) -> VisualBudgets | None:
    visual = getattr(encoder, "visual", None)  # a plain callable encoder (tests) emits no image spans to size
    return VisualBudgets(visual, **options) if visual is not None else None


def loader_metrics(loader) -> dict[str, int]:
    """`data/skipped/<reason>` and, for a mixture, `data/source/<name>` (samples handed out so far)."""
    counts = loader_counters(loader)
    metrics = {f"data/skipped/{reason}": n for reason, n in counts["skipped"].items()}
    if len(loader.dataset.source.sources) > 1:
        metrics.update({f"data/source/{name}": n for name, n in counts["sources"].items()})
    return metrics
