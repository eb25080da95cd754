"""`llava-train dpo-precompute RECIPE`: write the reference log-probs of every train pair beside its shard.

The reference is the one a live run would use: `stage.objective.reference` when set (a checkpoint, e.g. the KD
teacher), else the recipe's initial policy (`stage.init_from`, modules attached) with its adapters disabled. One
file per shard, written atomically, so an interrupted run resumes at the first shard without a complete file
(and rewrites a file whose key no longer matches the recipe).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from llava_train.data import pipeline
from llava_train.data.batch_stream import BatchStream, VisualBudgets
from llava_train.data.shards import ShardStream, build_loader
from llava_train.objectives import dpo_reference as store
from llava_train.objectives.preference import token_logprobs

log = logging.getLogger(__name__)


def train_shards(data) -> list[str]:
    return list(dict.fromkeys(url for source in pipeline.train_sources(data) for url in source.urls))


def build_reference(recipe, tokenizer):
    """(reference model, a context it runs in, a description); what a live run's `dpo` reference would be."""
    from llava_train.model.build import apply_stage, build_model
    from llava_train.model.io import initialise_from, load_any
    from llava_train.model.stages import resolve_stage
    from llava_train.modules.attach import attach_modules
    from llava_train.objectives.dpo import check_reference_tokenizer

    options = recipe.stage.objective
    if options.get("reference"):
        reference, reference_tokenizer = load_any(options["reference"])
        check_reference_tokenizer(reference_tokenizer, tokenizer, options["reference"])
        return reference, contextlib.nullcontext(), str(options["reference"])
    # The policy as the trainer builds it at step 0 (trainer.Trainer._build_model), run with adapters off.
    torch.manual_seed(recipe.train.seed)  # as the trainer seeds before building: random-init parts match
    model = build_model(recipe.model, tokenizer, None, seed=recipe.train.seed)
    if recipe.stage.init_from:
        lora = recipe.stage.lora if resolve_stage(recipe.stage).lora else None
        initialise_from(model, recipe.stage.init_from, lora, recipe.modules)
    attached = {module.name for module in model.attachments}
    attach_modules(model, [spec for spec in recipe.modules if spec["type"] not in attached])
    apply_stage(model, recipe.stage)
    return model, model.adapters_disabled(), f"initial policy ({recipe.stage.init_from or 'built from the recipe'})"


def shard_loader(shard: str, data, micro_batch_size: int, encoder, collate_fn):
    """Every pair of one shard once, in order, batched as the recipe's data section batches."""
    stream = ShardStream([shard], encoder, seed=0, shuffle=False, loop=False, max_bad_fraction=None)
    batching = pipeline.batching(data, micro_batch_size)
    return build_loader(BatchStream(stream, batching, VisualBudgets(encoder.visual, draw=False)), None, collate_fn)


@torch.no_grad()
def shard_logprobs(model, loader, chunk_size: int, device, autocast: bool) -> dict:
    pairs: dict[str, dict] = {}
    for batch in loader:
        batch = batch.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            hidden = model(batch).hidden_states
        logps, sample = token_logprobs(hidden, model.output_embeddings, batch, chunk_size)
        for s, (record_id, member) in enumerate(zip(batch.keys, batch.group_members)):
            pairs.setdefault(record_id, {})[member] = store.entry(logps[sample == s])
    return pairs


def precompute(recipe, progress: bool = True) -> dict:
    """Write the missing (or stale) cache files; returns {"written": [...], "kept": [...]} shard paths."""
    from llava_train.model.build import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.tokenizer)
    shards = train_shards(recipe.data)
    model, reference_mode, description = build_reference(recipe, tokenizer)
    encoder = pipeline.make_encoder(recipe.data, tokenizer, model, recipe.model.vision.path, accept_groups=True)
    key = store.cache_key(recipe, tokenizer, encoder)
    if encoder.visual.varies:
        raise ValueError("the connector's visual token count varies per step (Matryoshka): reference log-probs "
                         "depend on the step's budget and cannot be precomputed; use a live reference")
    todo = [s for s in shards if not _complete(store.cache_path(s), key)]
    result = {"written": [], "kept": [s for s in shards if s not in todo]}
    if result["kept"]:
        log.info("dpo-precompute: %d of %d shards already done, resuming", len(result["kept"]), len(shards))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    autocast = device.type == "cuda" and recipe.train.precision == "bf16"
    collate_fn = pipeline.make_collate(tokenizer, model)
    chunk = recipe.stage.loss.chunk_size
    mb = recipe.train.micro_batch_size

    def loader(shard):
        return shard_loader(shard, recipe.data, mb, encoder, collate_fn)

    with reference_mode:
        for shard in tqdm(todo, unit="shard", desc="dpo-precompute", disable=not progress, dynamic_ncols=True):
            pairs = shard_logprobs(model, loader(shard), chunk, device, autocast)
            store.write_cache(store.cache_path(shard), key, description, pairs)
            result["written"].append(shard)
    return result


def _complete(path: Path, key: dict) -> bool:
    return path.is_file() and store.read_cache(path)["key"] == key


def run_precompute(recipe_path: str, overrides: list[str]) -> int:
    from llava_train.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if recipe.stage.objective.get("type") != "dpo":
        raise SystemExit(f"dpo-precompute: {recipe_path} trains objective {recipe.stage.objective.get('type')!r}, "
                         "not dpo; set stage.objective.type=dpo")
    result = precompute(recipe, progress=recipe.train.progress_bar)
    print(f"dpo-precompute: wrote {len(result['written'])} shard files, kept {len(result['kept'])} done earlier "
          f"(beside the shards, in {store.CACHE_DIR}/)")
    return 0
