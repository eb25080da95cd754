"""Can this run resume from that checkpoint? Answered before any engine is built.

DeepSpeed's `load_checkpoint` fails late and cryptically on a folder that is damaged (a rank's
file missing, a copy cut short), was written by another recipe (another model, stage or ZeRO
layout) or holds tensors of other shapes; or it succeeds on the wrong thing. Each check here
names what differs and what to do instead.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from llava_train.model.io import WEIGHTS
from llava_train.recipe import Recipe
from llava_train.train import checkpoint as ckpt

# Recipe fields that decide what the saved tensors mean: the model's architecture, which
# parameters train (the optimizer state's layout) and how DeepSpeed partitioned it. Paths,
# learning rates, batch sizes and logging may change between a run and its resumption.
_MUST_MATCH = (
    "model.vision.config",
    "model.vision.feature_layer",
    "model.vision.use_cls",
    "model.connector",
    "model.lm.config",
    "stage.name",
    "stage.trainable",
    "stage.lora",
    "stage.objective",
    "modules",
    "train.zero_stage",
    "train.precision",
)


def check_resumable(path: str | Path, recipe: Recipe, world_size: int) -> dict:
    """Refuse a checkpoint that is incomplete, truncated, from another world size or another
    recipe (CheckpointError). Returns its manifest."""
    path = Path(path)
    manifest = ckpt.read_manifest(path)
    damaged = ckpt.missing_or_truncated(path, manifest)
    if damaged:
        raise ckpt.CheckpointError(
            f"{path} is truncated: {'; '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''}. "
            f"Restore the folder from a complete copy, or resume from an older checkpoint "
            f"(--resume {path.parent}/step-N) after moving this one away"
        )
    saved_world = manifest.get("world_size", world_size)
    if saved_world != world_size:
        raise ckpt.CheckpointError(
            f"{path} was written by {saved_world} ranks but this run has {world_size}; "
            "resume with the same number of ranks, or start a new run from its weights with "
            f"stage.init_from={path} (optimizer and data position start fresh)"
        )
    saved_recipe = manifest.get("recipe")
    if isinstance(saved_recipe, dict):
        differences = recipe_differences(saved_recipe, recipe.model_dump(mode="json"))
        if differences:
            raise ckpt.CheckpointError(
                f"{path} was written by a different recipe: {'; '.join(differences[:5])}. Resume it with the "
                f"recipe that wrote it (a copy is {path / 'recipe.yaml'}), or start a new run from its weights "
                f"with stage.init_from={path}"
            )
    return manifest


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """`key is X there, Y here` for each must-match field (and each key inside it) that differs.
    A field the saved recipe lacks (written by an older version) is not judged; a changed shape
    hiding there is still caught by check_model_shapes."""
    out = []
    for dotted in _MUST_MATCH:
        there, here = _lookup(saved, dotted), _lookup(current, dotted)
        if there is _ABSENT:
            continue
        out += [f"{key} is {a!r} there, {b!r} here" for key, a, b in _diff(dotted, there, here)]
    return out


def check_model_shapes(path: str | Path, model: nn.Module) -> None:
    """Refuse a checkpoint whose consolidated weights do not fit the model just built (e.g. a
    `model.lm.path` folder that now holds another model). Reads the safetensors header only."""
    from safetensors import safe_open

    weights = Path(path) / "model" / WEIGHTS
    if not weights.is_file():
        return  # nothing to compare against; check_resumable vouched for the folder
    with safe_open(str(weights), framework="pt") as handle:
        saved = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    built = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    problems = [f"{k}: {saved[k]} in the checkpoint, {built[k]} in this model"
                for k in built if k in saved and saved[k] != built[k]]
    missing = [k for k in built if k not in saved]
    if missing:
        problems.append(f"{len(missing)} parameters of this model are not in the checkpoint (e.g. {missing[0]})")
    if problems:
        raise ckpt.CheckpointError(
            f"{path} does not fit the model this recipe builds: {'; '.join(problems[:5])}. Check that the "
            "recipe's model paths hold the model the checkpoint was trained from"
        )


_ABSENT = object()


def _lookup(tree: dict, dotted: str):
    node = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return _ABSENT
        node = node[key]
    return node


def _diff(prefix: str, a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a):  # keys only the current recipe has: fields added since, not judged
            yield from _diff(f"{prefix}.{key}", a[key], b.get(key))
    elif a != b:
        yield prefix, a, b
