"""StepFlops, the FLOPs behind MFU, against torch's own FLOP counter on one real training step.

The models use eager attention: on the CPU, torch's FLOP counter sees no FLOPs in SDPA's CPU
kernel, while eager attention's QK^T and AV are plain matmuls over the full T x T square, which
is what StepFlops counts (and what the counter counts for SDPA's GPU kernels, forward). Both
sides count matmuls and attention only, so they agree exactly: no tolerance is needed.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_train.data.batch import IGNORE_INDEX, Example
from llava_train.data.collate import collate
from llava_train.model.build import apply_stage, build_model, load_tokenizer
from llava_train.objectives.lm import cross_entropy_sum
from llava_train.recipe import LossConfig, ModelConfig, StageConfig
from llava_train.modules.attach import attach_modules, release_module_parameters
from llava_train.train.flops import StepFlops
from tests.conftest import TINY_LM, TINY_VISION

TOWER_TRAINS = {"vision": True}  # the demo's sft stage: its random-init tower trains too


def _inplace_addmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# The chunked loss accumulates the LM head's weight gradient with an in-place addmm_, which
# torch's counter does not register (it knows only the out-of-place addmm): count it the same way.
COUNT_INPLACE_ADDMM = {torch.ops.aten.addmm_: _inplace_addmm}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def staged_model(tokenizer, stage: StageConfig, vision: dict = TINY_VISION, modules: list[dict] = (), **tower):
    cfg = ModelConfig(
        vision={"config": dict(vision), **tower}, lm={"config": dict(TINY_LM)}, tokenizer="unused",
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    attach_modules(model, list(modules))
    apply_stage(model, stage)
    release_module_parameters(model)
    return model


def image_batch(model, tokenizer, rows: int = 2):
    """`rows` samples of equal length (no padding), one image each, the last 6 text tokens supervised."""
    examples = []
    for row in range(rows):
        text = [5 + row + i for i in range(10)]
        ids = [model.image_token_id] * model.tokens_per_image + text
        labels = [IGNORE_INDEX] * (len(ids) - 6) + text[-6:]
        examples.append(Example(input_ids=ids, labels=labels, images=[torch.randn(3, 32, 32)]))
    batch = collate(examples, tokenizer.pad_token_id, model.image_token_id)
    assert batch.num_tokens == batch.input_ids.numel()  # no padding: every position is a real token
    return batch


def counted_step(model, batch) -> dict[str, int]:
    """Total FLOPs of one training forward + backward (the trainer's objective), and those of
    the image path (tower + connector) alone."""
    with FlopCounterMode(display=False, custom_mapping=COUNT_INPLACE_ADDMM) as counter:
        hidden = model(batch).hidden_states
        cross_entropy_sum(hidden, model.output_embeddings, batch.labels, LossConfig()).loss.backward()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    image_path = per_module.get("MultimodalLM.vision", 0) + per_module.get("MultimodalLM.connector", 0)
    return {"total": counter.get_total_flops(), "images": image_path}


def estimated_step(model, batch) -> dict[str, float]:
    flops = StepFlops.for_model(model)
    images = batch.pixel_values.shape[0]
    lm = flops.lm(batch.num_tokens, batch.input_ids.shape[1], batch.num_supervised_tokens)
    return {"total": lm + flops.vision(images), "images": flops.vision(images)}


@pytest.mark.parametrize(
    "stage",
    [
        StageConfig(name="pretrain"),  # connector only: the LM backpropagates activations, no LM weight grads
        StageConfig(name="sft"),  # connector + LM
        StageConfig(name="sft_lora"),  # connector + LoRA adapters; the LM's base weights stay frozen
        StageConfig(name="sft", trainable=TOWER_TRAINS),  # and the tower
    ],
    ids=["pretrain", "sft", "sft_lora", "sft_tower_trains"],
)
def test_step_flops_match_torch_flop_counter_per_stage(tokenizer, stage):
    model = staged_model(tokenizer, stage)
    batch = image_batch(model, tokenizer)
    # Matmuls and attention only on both sides, so the count is exact (no tolerance).
    assert estimated_step(model, batch) == counted_step(model, batch)


@pytest.mark.parametrize(
    "model_type, feature_layer, use_cls",
    [
        ("clip_vision_model", -1, False),  # every layer runs
        ("clip_vision_model", -2, False),  # the last layer is skipped
        ("clip_vision_model", -1, True),  # CLS kept: one more token for the connector and the LM
        ("clip_vision_model", -2, True),
        ("siglip_vision_model", -2, False),  # no CLS token at all
    ],
)
@pytest.mark.parametrize("tower_trains", [False, True], ids=["tower_frozen", "tower_trains"])
def test_step_flops_follow_the_tower_that_runs(tokenizer, model_type, feature_layer, use_cls, tower_trains):
    vision = {**TINY_VISION, "model_type": model_type, "num_hidden_layers": 3}
    stage = StageConfig(name="sft", trainable=TOWER_TRAINS if tower_trains else {})
    model = staged_model(tokenizer, stage, vision, feature_layer=feature_layer, use_cls=use_cls)
    batch = image_batch(model, tokenizer)
    assert estimated_step(model, batch) == counted_step(model, batch)


@pytest.mark.parametrize(
    "module",
    [
        # sparse dispatch runs exactly the routed pairs: what the model-FLOP count states (dense runs all E)
        {"type": "moe_lora", "experts": 3, "rank": 4, "top_k": 2, "dispatch": "sparse"},
        {"type": "moe_lora", "experts": 3, "rank": 4, "top_k": 1, "dispatch": "sparse", "router": "projection"},
        {"type": "moe_upcycle", "experts": 3, "top_k": 2, "capacity_factor": None},  # no dropped tokens
        {"type": "moe_upcycle", "experts": 3, "top_k": 2, "capacity_factor": None, "expert_lora": 2},
    ],
    ids=["moe_lora_top2", "moe_lora_per_projection", "moe_upcycle", "moe_upcycle_lora_experts"],
)
@pytest.mark.parametrize("stage", [StageConfig(name="sft"), StageConfig(name="sft", trainable={"lm": False})],
                         ids=["lm_trains", "lm_frozen"])
def test_step_flops_count_what_attached_modules_run(tokenizer, module, stage):
    model = staged_model(tokenizer, stage, modules=[module])
    batch = image_batch(model, tokenizer)
    assert estimated_step(model, batch) == counted_step(model, batch)
