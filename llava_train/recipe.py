"""Recipes: a typed schema, `inherit:` of base recipes, `key=value` overrides.

Everything is validated here, before any model or data is touched. Errors name
the full dotted path of the offending key and, for unknown keys, the nearest
valid one.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A mistake in a recipe or an override, reported before any work starts."""


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `2e-5` and `1.0e5` are strings. Recipes (and the HF
    config dicts inside them, e.g. `rms_norm_eps: 1e-6`) mean numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- model


class PretrainedSource(Section):
    """A part built from a local pretrained folder or from an HF config dict (random init)."""

    path: str | None = None  # local folder saved with save_pretrained (never a hub id)
    config: dict[str, Any] | None = None  # or an HF config dict (needs `model_type`)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("set exactly one of `path` (local pretrained folder) or `config` (HF config dict)")
        return self


class VisionConfig(PretrainedSource):
    """Any HF vision encoder (CLIP, SigLIP)."""

    feature_layer: int = -2  # hidden state index the connector reads (LLaVA uses the penultimate)
    use_cls: bool = False  # keep the CLS token (CLIP) in the visual tokens


class ConnectorConfig(Section):
    type: str = "mlp"
    options: dict[str, Any] = Field(default_factory=dict)  # connector-specific keyword arguments


class LMConfig(PretrainedSource):
    """Any AutoModelForCausalLM that accepts inputs_embeds."""


class ModelConfig(Section):
    vision: VisionConfig
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    lm: LMConfig
    tokenizer: str  # local tokenizer folder; `<image>` is added when missing
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False


# ----------------------------------------------------------------------------- stage


class Trainable(Section):
    vision: bool | None = None  # None = take the stage preset's value
    connector: bool | None = None
    lm: bool | None = None


class LearningRates(Section):
    vision: float | None = None  # None = train.lr
    connector: float | None = None
    lm: float | None = None
    modules: float | None = None  # attached modules' own parameters (a module's `lr` option wins)


class LoraConfig(Section):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names inside the LM; matched as peft suffixes below the LM only, never the vision tower.
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class LossConfig(Section):
    """The LM head's cross-entropy (kernels.linear_cross_entropy); logits never exist for all tokens."""

    chunk_size: int = Field(1024, gt=0)  # rows per [rows, vocab] fp32 logits block (512 MiB at 128k vocab)
    label_smoothing: float = Field(0.0, ge=0, le=1)
    z_loss: float = Field(0.0, ge=0)  # PaLM's z_loss * logsumexp(logits)^2 per token (1e-4 is typical)
    backend: Literal["auto", "torch", "triton", "liger"] = "auto"  # auto: triton on CUDA, else torch


class StageConfig(Section):
    name: Literal["pretrain", "sft", "sft_lora"] = "sft"
    trainable: Trainable = Field(default_factory=Trainable)
    lr: LearningRates = Field(default_factory=LearningRates)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    init_from: str | None = None  # a checkpoint folder (step-N) of an earlier stage
    # `lm`, or `{type: NAME, ...options}` of a registered objective (validated in llava_train/composition.py)
    objective: dict[str, Any] = Field(default_factory=lambda: {"type": "lm"})
    loss: LossConfig = Field(default_factory=LossConfig)  # the LM cross-entropy (also the CE term of kd/dpo)

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_by_name(cls, value):
        if isinstance(value, str):
            return {"type": value}
        if isinstance(value, dict) and "type" not in value:
            raise ValueError("stage.objective needs a `type` (e.g. lm)")
        return value

    @model_validator(mode="after")
    def _lora_needs_the_lm(self):
        if self.name == "sft_lora" and self.trainable.lm is False:
            raise ValueError(
                "stage.name=sft_lora trains the LM through LoRA adapters, but stage.trainable.lm=false leaves no "
                "adapters to train; use stage.name=pretrain (connector only) or drop stage.trainable.lm"
            )
        return self


# ----------------------------------------------------------------------------- data


class SourceConfig(Section):
    """One entry of a weighted mixture in data.train (like LLaVA-OneVision's data YAMLs)."""

    name: str  # logged as data/source/<name>
    paths: list[str]  # shard paths, globs or brace patterns of this source
    weight: float = Field(1.0, gt=0)  # sampling weight; a sample comes from this source with weight / sum of weights


def _has_sources(train) -> bool:
    return isinstance(train, list) and any(isinstance(item, (dict, SourceConfig)) for item in train)


class DataConfig(Section):
    # Shard paths, globs or brace patterns (`shards-{000000..000127}.tar`), read as one pool;
    # or a weighted mixture: a list of {name, paths, weight}.
    train: Annotated[
        Annotated[list[str], Tag("paths")] | Annotated[list[SourceConfig], Tag("sources")],
        Discriminator(lambda value: "sources" if _has_sources(value) else "paths"),
    ]
    eval: list[str] = Field(default_factory=list)
    template: str = "vicuna_v1"  # plain | vicuna_v1 | llama3 | chatml | tokenizer
    system_prompt: str | None = None
    max_length: int = 2048
    # pad = pad-to-square with the mean (LLaVA-1.5); anyres = LLaVA-NeXT tiles + thumbnail (see anyres_grids)
    image_mode: Literal["resize", "pad", "anyres"] = "pad"
    anyres_grids: list[tuple[int, int]] = Field(default_factory=lambda: [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)])
    shuffle: bool = True
    num_workers: int = 0
    max_eval_samples: int | None = None
    max_bad_fraction: float = Field(0.1, ge=0, le=1)  # stop when more of the samples read are bad (after 200)
    # Batching (llava_train/data/batching.py). Without any of these a micro-batch is train.micro_batch_size samples.
    group_by_modality_length: bool = False  # image with image, text with text, similar lengths together
    max_tokens_per_batch: int | None = Field(None, gt=0)  # token budget per micro-batch (rows x longest row)
    packing: bool = False  # several samples per row, block-diagonal attention; train.micro_batch_size counts rows
    max_tokens_per_row: int | None = Field(None, gt=0)  # row capacity when packing (default max_length)
    batching_window: int = Field(256, gt=0)  # samples planned together; a resume re-reads at most this many

    @model_validator(mode="after")
    def _batching_fits(self):
        if self.packing and self.group_by_modality_length:
            raise ValueError(
                "packing and group_by_modality_length do not combine (a packed row mixes samples anyway); "
                "set one of them"
            )
        row = self.max_tokens_per_row or self.max_length
        if self.max_tokens_per_row is not None and not self.packing:
            raise ValueError("max_tokens_per_row only applies with packing: true; set packing or drop it")
        if self.packing and row < self.max_length:
            raise ValueError(
                f"max_tokens_per_row={row} is below max_length={self.max_length}: the longest samples would not "
                "fit in a row; raise max_tokens_per_row or lower max_length"
            )
        longest = row if self.packing else self.max_length
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < longest:
            what = "max_tokens_per_row" if self.packing else "max_length"
            raise ValueError(
                f"max_tokens_per_batch={self.max_tokens_per_batch} is below {what}={longest}: a longest "
                f"{'row' if self.packing else 'sample'} would not fit; raise max_tokens_per_batch to at least {longest}"
            )
        if len({s.name for s in self.sources}) != len(self.sources):
            raise ValueError(f"data.train source names must be unique, got {[s.name for s in self.sources]}")
        return self

    @property
    def sources(self) -> list[SourceConfig]:
        """data.train as sources; a plain list of paths is one source named `train`."""
        if self.train and isinstance(self.train[0], SourceConfig):
            return list(self.train)
        return [SourceConfig(name="train", paths=list(self.train))]


# ----------------------------------------------------------------------------- train


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "llava_train"
    name: str | None = None


class TrainConfig(Section):
    output_dir: str
    seed: int = 0
    max_steps: int = Field(100, gt=0)
    micro_batch_size: int = Field(8, gt=0)  # samples per rank per forward
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, ge=0)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_bad_steps: int = Field(5, ge=1)  # stop after this many steps in a row with a non-finite loss (each is skipped)
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload: bool = False  # ZeRO CPU offload of optimizer states (and parameters under stage 3)
    deepspeed_config: str | None = None  # a JSON preset from launch/; recipe values win for batch/precision
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0)  # 0 = only at the end
    # Generation eval (docs/evaluation.md): every N steps (and at the end), greedy answers to the first
    # eval_generate_samples questions of data.eval, scored as `llava-train eval` scores them; 0 = off.
    eval_generate_every: int = Field(0, ge=0)
    eval_generate_samples: int = Field(64, gt=0)
    eval_generate_max_new_tokens: int = Field(32, gt=0)
    eval_generate_by: list[str] = Field(default_factory=list)  # meta fields to break accuracy down by
    save_every: int = Field(0, ge=0)  # 0 = only at the end
    keep_last: int = Field(2, ge=1)
    resume: str | None = None  # "auto" = newest complete checkpoint in output_dir, or a path
    progress_bar: bool = True
    sync_timing: bool = False  # synchronise the GPU at phase boundaries for exact step-time splits (bench)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    tensorboard: bool = False  # also write metrics as TensorBoard scalars to OUTPUT/tensorboard (rank 0)

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload and self.zero_stage == 0:
            raise ValueError("offload: true needs zero_stage 1, 2 or 3 (ZeRO partitions what it offloads)")
        return self


class Recipe(Section):
    plugins: list[str] = Field(default_factory=list)  # python modules imported first: they register modules/objectives
    model: ModelConfig
    # Technique modules attached to the model, `- {type: NAME, ...options}`; each validated by its own schema
    # (llava_train/modules/, llava_train/composition.py).
    modules: list[dict[str, Any]] = Field(default_factory=list)
    stage: StageConfig = Field(default_factory=StageConfig)
    data: DataConfig
    train: TrainConfig

    @model_validator(mode="after")
    def _generation_eval_needs_eval_data(self):
        if self.train.eval_generate_every and not self.data.eval:
            raise ValueError(
                "train.eval_generate_every needs held-out shards in data.eval; set data.eval or eval_generate_every=0"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (following `inherit:`), apply `key=value` overrides, validate."""
    raw = _read_with_inheritance(Path(path), seen=())
    for item in overrides:
        _apply_override(raw, item)
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict, source: str = "<recipe>") -> Recipe:
    """Schema first, then every cross-section rule (modules, objective, stage, data, engine)."""
    from llava_train.composition import check_composition, import_plugins

    if isinstance(raw, dict):
        import_plugins(raw.get("plugins") or [], source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{source}: " + describe_errors(exc)) from None
    check_composition(recipe, source)
    return recipe


def describe_errors(exc: ValidationError, prefix: str = "", root: type[BaseModel] | None = None) -> str:
    """Each error with its full key path; `root`/`prefix`: errors of a sub-schema (a module's options)
    validated on its own, reported under the recipe path `prefix`."""
    return "; ".join(_describe(err, prefix, root or Recipe) for err in exc.errors())


def _read_with_inheritance(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        via = f" (the `inherit:` of {seen[-1]})" if seen else ""
        raise RecipeError(f"recipe file not found: {path}{via}")
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"`inherit:` cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        data = _parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: `inherit:` must be one file path (relative to this recipe), got {parent!r}")
    base = _read_with_inheritance((path.parent / parent), seen=(*seen, path))
    return _deep_merge(base, data)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"override `{item}` is not of the form key=value (e.g. train.lr=2e-5)")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise RecipeError(f"override `{item}`: `{dotted}` is not a dotted key path (e.g. train.lr=2e-5)")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override `{dotted}`: `{'.'.join(keys[: depth + 1])}` is a value, not a section")
        node = child
    try:
        node[keys[-1]] = _parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        raise RecipeError(f"override `{item}`: the value is not valid YAML (quote strings with special characters)") from None


_TYPE_NAMES = {
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "int_type": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "a boolean (true/false)",
    "bool_type": "a boolean (true/false)",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping (section)",
    "literal_error": None,
}


def _describe(err: dict, prefix: str = "", root: type[BaseModel] | None = None) -> str:
    loc = [str(part) for part in err["loc"]]
    where = ".".join(([prefix] if prefix else []) + loc) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key `{where}`" + _nearest_hint(loc, prefix, root or Recipe)
    if kind == "missing":
        return f"missing required key `{where}`"
    if kind == "value_error":  # our own validators: the message is the whole story
        return f"`{where}`: {err['msg'].removeprefix('Value error, ')}"
    got = err.get("input")
    if kind in _TYPE_NAMES and _TYPE_NAMES[kind]:
        return f"`{where}` must be {_TYPE_NAMES[kind]}, got {got!r}"
    return f"`{where}`: {err['msg']} (got {got!r})"


def _nearest_hint(loc: list[str], outer: str, root: type[BaseModel]) -> str:
    section = _section_at(loc[:-1], root)
    if section is None:
        return ""
    valid = list(section.model_fields)
    close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
    prefix = ".".join(([outer] if outer else []) + loc[:-1])
    if close:
        return f"; did you mean `{prefix + '.' if prefix else ''}{close[0]}`?"
    return f"; valid keys here: {', '.join(valid)}"


def _section_at(loc: list[str], root: type[BaseModel]) -> type[BaseModel] | None:
    section: type[BaseModel] = root
    for key in loc:
        field = section.model_fields.get(key)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        section = annotation
    return section
