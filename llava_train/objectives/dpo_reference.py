"""Precomputed DPO reference log-probs, stored beside the shards: what no reference model costs.

`llava-train dpo-precompute RECIPE` (llava_train/objectives/dpo_precompute.py) runs the reference once over the
train shards and writes, per shard `DIR/NAME.tar`, the file `DIR/reference_logps/NAME.tar.pt`:

    {"key": {what the values depend on: digest per field}, "reference": str,
     "pairs": {record id: {"chosen": {"sum", "mean", "tokens"}, "rejected": {...}}}}

`tokens` holds one fp32 log-prob per response token, so dense DPO's token weights apply to a precomputed
reference as to a live one. The values hold only for the weights, tokens and pixels they were computed on, so the
key has a digest of the reference (`reference_identity`), the tokenizer, the template, the image preprocessing and
the truncation; a run whose reference, data section or tokenizer disagrees is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

CACHE_DIR = "reference_logps"
MEMBERS = ("chosen", "rejected")


def cache_path(shard: str | Path) -> Path:
    shard = Path(shard)
    return shard.parent / CACHE_DIR / f"{shard.name}.pt"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(recipe, tokenizer, encoder) -> dict[str, str]:
    """Digests of everything the stored log-probs depend on.

    `recipe`: the training recipe; `encoder`: its SampleEncoder (pipeline.make_encoder)."""
    data = recipe.data
    vocab = sorted(tokenizer.get_vocab().items())
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    template = [data.template, data.system_prompt]
    if data.template == "tokenizer":
        template.append(tokenizer.chat_template)
    processor = {k: (int(v) if k == "resample" else v) for k, v in vars(encoder.image_processor).items()}
    images = [data.image_mode, processor, encoder.visual.max_tokens]
    if encoder.tiler is not None:
        images.append(data.anyres_grids)
    return {
        "reference": _digest(reference_identity(recipe)),
        "tokenizer": _digest([type(tokenizer).__name__, vocab, specials]),
        "template": _digest(template),
        "image preprocessing": _digest(images),
        "truncation": _digest(data.max_length),
    }


def reference_identity(recipe) -> list:
    """What the reference's weights are: the checkpoint's weight files (sampled, so a copy elsewhere matches and a
    retrained one does not) or, built from the recipe, its model section and seed. An adapters-disabled reference
    depends on the stage's LoRA too (adapters the stage continues are off in the reference; others are folded)."""
    options = recipe.stage.objective
    if options.get("reference"):
        return ["checkpoint", weights_fingerprint(Path(options["reference"]))]
    stage = recipe.stage.model_dump(mode="json")
    if recipe.stage.init_from:
        return ["initial policy", weights_fingerprint(Path(recipe.stage.init_from)), stage["lora"]]
    model = recipe.model.model_dump(mode="json", exclude={"tokenizer"})  # the tokenizer has its own key
    return ["built", model, recipe.train.seed, stage["lora"]]


def weights_fingerprint(folder: Path, samples: int = 16, span: int = 1 << 16) -> list:
    """Name, size and `samples` evenly spaced `span`-byte reads of every weight file under `folder`: cheap for a
    70B checkpoint, yet two trainings of one architecture differ in every read."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file()
                   and "deepspeed" not in p.parts and not p.name.startswith("rank"))  # fmt: skip
    if not files:
        raise FileNotFoundError(f"{folder} holds no weight files (*.safetensors, *.bin): is it a checkpoint?")
    found = []
    for path in files:
        size = path.stat().st_size
        reads = hashlib.sha256()
        with path.open("rb") as handle:
            for offset in sorted({size * i // samples for i in range(samples)}):
                handle.seek(offset)
                reads.update(handle.read(span))
        found.append([str(path.relative_to(folder)), size, reads.hexdigest()[:16]])
    return found


def check_key(stored: dict[str, str], current: dict[str, str], path: Path) -> None:
    differs = [name for name in current if stored.get(name) != current[name]]
    if differs:
        raise ValueError(
            f"precomputed reference log-probs {path} were written for another {' and '.join(differs)} than this "
            "recipe's: the stored values no longer match its reference, tokens or pixels; rerun `llava-train dpo-precompute "
            f"RECIPE` (it rewrites mismatched files), or restore the recipe's {', '.join(differs)}"
        )


def write_cache(path: Path, key: dict, reference: str, pairs: dict) -> None:
    """Atomically: a file is complete or absent, so an interrupted precompute resumes at the first missing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"key": key, "reference": reference, "pairs": pairs}, partial)
    partial.replace(path)


def read_cache(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def entry(tokens: torch.Tensor) -> dict:
    tokens = tokens.detach().float().cpu()
    return {"sum": float(tokens.double().sum()), "mean": float(tokens.double().mean()), "tokens": tokens}


class PrecomputedReference:
    """Per response token reference log-probs of every pair in `shards`, looked up by (record id, member)."""

    def __init__(self, shards: list[str], key: dict[str, str]):
        self.pairs: dict[str, dict] = {}
        missing = [s for s in shards if not cache_path(s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"no precomputed reference log-probs for {len(missing)} of {len(shards)} train shards (first: "
                f"{cache_path(missing[0])}); run `llava-train dpo-precompute RECIPE` first, or unset "
                "stage.objective.precomputed_reference to use a live reference"
            )
        for shard in shards:
            path = cache_path(shard)
            stored = read_cache(path)
            check_key(stored["key"], key, path)
            for record_id, members in stored["pairs"].items():
                if record_id in self.pairs:
                    raise ValueError(
                        f"pair id {record_id!r} occurs in two train shards ({path}); precomputed values are found "
                        "by id: give every pair a unique id when converting (`data convert-pairs`)"
                    )
                self.pairs[record_id] = members

    def token_logprobs(self, batch, sample: torch.Tensor) -> torch.Tensor:
        """[K] reference log-probs aligned with `preference.token_logprobs`' tokens (`sample` per token)."""
        out = torch.zeros(sample.shape[0], dtype=torch.float32, device=sample.device)
        for s, (record_id, member) in enumerate(zip(batch.keys, batch.group_members)):
            stored = self.pairs.get(record_id, {}).get(member)
            if stored is None:
                raise KeyError(
                    f"no precomputed reference log-probs for pair {record_id!r} ({member}); the shards changed "
                    "since `llava-train dpo-precompute` ran: rerun it"
                )
            where = sample == s
            if int(where.sum()) != stored["tokens"].numel():
                raise ValueError(
                    f"pair {record_id!r} ({member}) has {int(where.sum())} response tokens here but "
                    f"{stored['tokens'].numel()} in its precomputed reference log-probs: rerun `llava-train "
                    "dpo-precompute`"
                )
            out[where] = stored["tokens"].to(out.device)
        return out
