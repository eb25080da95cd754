"""Shared fixtures: a locally trained tokenizer, small demo shards and tiny model recipes.

Nothing comes from a hub: models are built from config dicts, the tokenizer is trained here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parent.parent

TINY_VISION = {
    "model_type": "clip_vision_model",
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
TINY_LM = {
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """Small coloured-shape shards + tokenizer (data_tools.demo_data), built once per session."""
    from data_tools.demo_data import build_demo_data

    root = tmp_path_factory.mktemp("demo_data")
    build_demo_data(root, num_train=128, num_eval=32, image_size=32, samples_per_shard=16)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(demo_data) -> Path:
    return demo_data / "tokenizer"


def tiny_recipe_dict(demo_data: Path, output_dir: Path, **train) -> dict:
    """A complete recipe for a tiny model on the small demo shards."""
    return {
        "model": {
            "vision": {"config": dict(TINY_VISION), "feature_layer": -2},
            "connector": {"type": "mlp"},
            "lm": {"config": dict(TINY_LM)},
            "tokenizer": str(demo_data / "tokenizer"),
        },
        "stage": {"name": "sft"},
        "data": {
            "train": [str(demo_data / "sft" / "shard-*.tar")],
            "eval": [str(demo_data / "eval" / "shard-*.tar")],
            "template": "vicuna_v1",
            "max_length": 128,
            "shuffle": True,
        },
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 4,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "progress_bar": False,
            "wandb": {"mode": "disabled"},
            **train,
        },
    }


@pytest.fixture(autouse=True)
def _no_inherited_process_group_vars():
    """An in-process Trainer makes this process a world of one by setting RANK, MASTER_PORT, ... in
    os.environ; a later test's subprocess would inherit them and try to listen on the port this process's
    gloo store still holds (EADDRINUSE). Drop them after each test (the process group itself stays)."""
    yield
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
