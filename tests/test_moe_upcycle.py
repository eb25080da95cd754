"""moe_upcycle invariants (llava_train/modules/moe_upcycle.py): upcycling is the identity, capacity
drops what the formula says, LoRA experts share one frozen copy, training resumes exactly."""

from __future__ import annotations

import json


import pytest
import torch

from llava_train.model.build import apply_stage
from llava_train.modules.attach import release_module_parameters
from llava_train.modules.moe_upcycle import UpcycledMoE, capacity_keep, expert_capacity
from llava_train.recipe import validate_recipe
from tests.test_model import make_batch
from tests.test_moe_lora import built
from tests.test_train import assert_resume_matches
from tests.conftest import tiny_recipe_dict


def upcycle_recipe(demo_data, out, **options) -> dict:
    recipe = tiny_recipe_dict(demo_data, out, max_steps=4, lr=1e-2)
    recipe["modules"] = [{"type": "moe_upcycle", "experts": 3, "capacity_factor": None, **options}]
    recipe["data"]["eval"] = []
    return recipe


def perturb_experts(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate_up_proj" in name or "down_proj" in name and param.dim() == 3 or "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("expert_lora", [None, 2])
def test_upcycled_layer_equals_the_dense_mlp(demo_data, tmp_path, top_k, expert_lora):
    _, base, tokenizer = built(upcycle_recipe(demo_data, tmp_path), attach=False)
    _, model, _ = built(upcycle_recipe(demo_data, tmp_path, top_k=top_k, expert_lora=expert_lora, layers="all"))
    assert sum(isinstance(m, UpcycledMoE) for m in model.modules()) == 2
    batch = make_batch(model, tokenizer)
    with torch.no_grad():
        expected = base(batch).hidden_states
        torch.testing.assert_close(model(batch).hidden_states, expected, rtol=1e-5, atol=1e-5)
        perturb_experts(model)
        assert not torch.allclose(model(batch).hidden_states, expected, atol=1e-4)  # experts now differ


def test_capacity_drops_follow_the_formula():
    n, e, k = 20, 4, 2
    assert expert_capacity(1.0, n, k, e) == 10 and expert_capacity(None, n, k, e) is None
    chosen = torch.stack([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)], dim=1)  # all to 0, 1
    keep = capacity_keep(chosen, e, capacity=6)
    assert keep[:, 0].sum() == 6 and keep[:, 1].sum() == 6  # each expert keeps its capacity, drops the rest
    assert keep[:6, 0].all() and not keep[6:, 0].any()  # by position within a choice
    # First choices before second choices: expert 1 is the first choice of tokens 0-3, the second of all.
    chosen = torch.tensor([[1, 0]] * 4 + [[0, 1]] * 16)
    keep = capacity_keep(chosen, e, capacity=5)
    assert keep[:4, 0].all()  # all four first choices of expert 1 fit...
    assert int(keep[:, 1][chosen[:, 1] == 1].sum()) == 1  # ...leaving room for one second choice
    assert int((~keep).sum()) == 2 * n - 10


def test_lora_experts_keep_their_shared_copy_frozen_whatever_the_stage(demo_data, tmp_path):
    recipe, model, _ = built(upcycle_recipe(demo_data, tmp_path, expert_lora=2))
    apply_stage(model, recipe.stage)  # sft: the LM trains
    release_module_parameters(model)
    for name, param in model.named_parameters():
        if ".shared." in name:
            assert not param.requires_grad, name
        if "lora_A" in name or "router" in name:
            assert param.requires_grad, name


def test_dropped_fraction_is_logged_and_training_resumes_exactly(demo_data, tmp_path):
    def recipe(out, **train):
        r = upcycle_recipe(demo_data, out, capacity_factor=0.5, jitter=0.1)
        r["train"].update(train)
        return validate_recipe(r)

    assert_resume_matches(recipe, tmp_path)
    row = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["objective/moe/dropped/layer1"] > 0.3  # capacity 0.5 x tokens x 2 / 3 drops about half


def test_refused_with_moe_lora_and_on_a_missing_layer(demo_data, tmp_path):
    from llava_train.recipe import RecipeError

    recipe = upcycle_recipe(demo_data, tmp_path)
    recipe["modules"].append({"type": "moe_lora"})
    with pytest.raises(RecipeError, match="conflict"):
        validate_recipe(recipe)
    with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
        built(upcycle_recipe(demo_data, tmp_path, layers=[7]))


def two_row_batch(model, tokenizer):
    """Two prompts with an image, the second shorter (padding on the right)."""
    from llava_train.data.batch import IGNORE_INDEX, Example
    from llava_train.data.collate import collate

    text = tokenizer("what colour is the circle", add_special_tokens=False)["input_ids"]
    ids = [model.image_token_id] * model.tokens_per_image + text
    rows = [ids, ids[:-2]]
    examples = [Example(input_ids=r, labels=[IGNORE_INDEX] * len(r), images=[torch.randn(3, 32, 32)]) for r in rows]
    return collate(examples, tokenizer.pad_token_id, model.image_token_id)


def exported(demo_data, tmp_path, lm_type="llama", **options):
    """An upcycled tiny model with distinct experts, saved and exported: (model, tokenizer, export folder)."""
    from llava_train.model.export import export_checkpoint
    from llava_train.model.io import save_model_files

    recipe = upcycle_recipe(demo_data, tmp_path, **options)
    recipe["model"]["lm"]["config"]["model_type"] = lm_type
    _, model, tokenizer = built(recipe)
    perturb_experts(model)
    save_model_files(model.eval(), tokenizer, tmp_path / "ckpt" / "model", rank=0, lora=None, connector={"type": "mlp"})
    return model, tokenizer, export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")


@pytest.mark.parametrize(
    "lm_type,options",
    [
        ("llama", {"top_k": 2, "layers": "every_other", "capacity_factor": 1.5}),  # Qwen2-MoE's mlp_only_layers
        ("qwen2", {"top_k": 2, "layers": "all", "expert_lora": 2}),  # qkv biases; LoRA experts merged
        ("llama", {"top_k": 1, "layers": [0], "renormalise": False}),  # norm_topk_prob off
    ],
    ids=["llama-every-other", "qwen2-lora-experts", "llama-top1"],
)
def test_exports_as_qwen2_moe_llava_with_equal_logits(demo_data, tmp_path, lm_type, options):
    from transformers import LlavaForConditionalGeneration

    from llava_train.model.io import load_any

    model, tokenizer, out = exported(demo_data, tmp_path, lm_type, **options)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["model_type"] == "qwen2_moe"
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    upcycled = [i for i, layer in enumerate(model.decoder.layers) if isinstance(layer.mlp, UpcycledMoE)]
    sparse = [i for i, layer in enumerate(hf.model.language_model.layers) if hasattr(layer.mlp, "experts")]
    assert sparse == upcycled
    batch = two_row_batch(model, tokenizer)
    with torch.no_grad():
        ours = model.output_embeddings(model(batch).hidden_states)
        theirs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
        imported, _ = load_any(out)  # and back: generate and eval read the exported folder
        back = imported.output_embeddings(imported(batch).hidden_states)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(theirs.logits[real], ours[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back[real], ours[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "options,reason",
    [({"gate": "none"}, "gate is `none`"), ({"eval_capacity_factor": 1.0}, "keeps every token at inference")],
)
def test_what_qwen2_moe_cannot_hold_keeps_the_llava_train_format_and_says_why(demo_data, tmp_path, caplog, options, reason):
    _, _, out = exported(demo_data, tmp_path, **options)
    assert (out / "llava_train_model.json").is_file() and not (out / "config.json").exists()
    assert reason in caplog.text and "moe_upcycle stays in the llava_train format" in caplog.text
