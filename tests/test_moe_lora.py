"""moe_lora invariants against plain references (llava_train/modules/moe_lora.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from llava_train.model.build import apply_stage, build_model, load_tokenizer
from llava_train.model.export import export_checkpoint
from llava_train.model.io import load_model_files
from llava_train.model.lora import add_lora
from llava_train.modules.attach import attach_modules, release_module_parameters
from llava_train.modules.moe_lora import MoELoRALinear, expert_deltas_dense, expert_deltas_sparse
from llava_train.modules.routing import Router, balance_loss, route
from llava_train.recipe import LoraConfig, validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import REPO, tiny_recipe_dict
from tests.test_model import make_batch
from tests.test_train import assert_resume_matches

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def moe_recipe(demo_data, out, stage=None, **options) -> dict:
    recipe = tiny_recipe_dict(demo_data, out, max_steps=4, lr=1e-2)
    recipe["modules"] = [{"type": "moe_lora", "experts": 3, "rank": 4, **options}]
    recipe["stage"] = stage or {"name": "sft", "trainable": {"lm": False}}
    recipe["data"]["eval"] = []
    return recipe


def built(recipe_dict, attach=True):
    recipe = validate_recipe(recipe_dict)
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer)
    if attach:
        attach_modules(model, recipe.modules)
    return recipe, model, tokenizer


def randomise_b(model, std=0.05):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)


# ----------------------------------------------------------------------------- pure functions


def test_sparse_dispatch_equals_dense_masked_reference_with_grads():
    torch.manual_seed(0)
    n, d_in, d_out, e, r, k = 37, 16, 12, 4, 3, 2
    x = torch.randn(n, d_in, requires_grad=True)
    a = torch.randn(e, r, d_in, requires_grad=True)
    b = torch.randn(e, d_out, r, requires_grad=True)
    logits = torch.randn(n, e, requires_grad=True)
    outs, grads = [], []
    for fn in (expert_deltas_sparse, expert_deltas_dense):
        _, chosen, weights = route(logits, k, "prob", True)
        chosen = chosen.clone()
        chosen[:5] = 1  # an expert that some tokens pick twice (both slots) and one that nobody picks
        chosen[chosen == 3] = 2
        out = fn(x, a, b, chosen, weights, 0.5)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, d_out)).sum(), (x, a, b, logits)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for sparse, dense in zip(*grads):
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_balance_loss_values_gradient_and_padding():
    e, n = 4, 64
    uniform = torch.full((n, e), 1 / e, requires_grad=True)
    chosen = (torch.arange(n) % e).unsqueeze(-1)
    counted = torch.ones(n, dtype=torch.bool)
    assert float(balance_loss(uniform, chosen, counted)) == pytest.approx(1.0)
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1
    assert float(balance_loss(collapsed, torch.zeros(n, 1, dtype=torch.long), counted)) == pytest.approx(e)
    # The gradient flows through the mean probabilities only: d/dp[i, j] = E * f_j / n.
    probs = torch.rand(n, e).softmax(-1).requires_grad_()
    picked = probs.argmax(-1, keepdim=True)
    (grad,) = torch.autograd.grad(balance_loss(probs, picked, counted), probs)
    fraction = torch.bincount(picked.flatten(), minlength=e).float() / n
    torch.testing.assert_close(grad, (e * fraction / n).expand(n, e))
    # Padding never counts: appended rows with arbitrary routing change nothing.
    padded = torch.cat([probs, torch.rand(10, e).softmax(-1)])
    padded_chosen = torch.cat([picked, torch.zeros(10, 1, dtype=torch.long)])
    mask = torch.cat([counted, torch.zeros(10, dtype=torch.bool)])
    assert float(balance_loss(padded, padded_chosen, mask)) == pytest.approx(float(balance_loss(probs, picked, counted)))


def test_router_decisions_in_bf16_autocast_equal_fp32():
    from llava_train.data.batch import TokenRole
    from llava_train.model import context
    from llava_train.modules.moe_lora import MoELoRAOptions

    torch.manual_seed(0)
    router = Router(32, MoELoRAOptions(experts=8, top_k=2), "layer0", "moe_lora")
    x = torch.randn(2, 50, 32).bfloat16().float()  # values a bf16 model would hand over
    roles = torch.full((2, 50), int(TokenRole.TEXT), dtype=torch.int8)
    ctx = context.ForwardContext(roles, torch.zeros(2, 50, dtype=torch.long), torch.zeros(2, 50, dtype=torch.long),
                                 torch.zeros(0, dtype=torch.long), 1, False)
    with context.activate(ctx):
        plain = router(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = router(x.bfloat16())
    assert torch.equal(plain[1], autocast[1]) and autocast[2].dtype == torch.float32
    torch.testing.assert_close(plain[2], autocast[2])


# ----------------------------------------------------------------------------- on the model


def test_zero_init_equals_the_base_and_adapters_disabled(demo_data, tmp_path):
    _, base, tokenizer = built(moe_recipe(demo_data, tmp_path), attach=False)
    _, model, _ = built(moe_recipe(demo_data, tmp_path, top_k=2))
    batch = make_batch(model, tokenizer)
    with torch.no_grad():
        expected = base(batch).hidden_states
        torch.testing.assert_close(model(batch).hidden_states, expected)
        randomise_b(model)
        assert not torch.allclose(model(batch).hidden_states, expected)
        with model.adapters_disabled():
            torch.testing.assert_close(model(batch).hidden_states, expected)


@pytest.mark.parametrize("router", ["block", "projection"])
def test_one_expert_equals_peft_lora_outputs_and_grads(demo_data, tmp_path, router):
    _, moe, tokenizer = built(moe_recipe(demo_data, tmp_path, experts=1, rank=4, alpha=8, router=router,
                                         balance_coef=0.0))
    _, peft_model, _ = built(moe_recipe(demo_data, tmp_path), attach=False)
    peft_model.lm = add_lora(peft_model.lm, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS))
    moe_layers = {n: m for n, m in moe.lm.named_modules() if isinstance(m, MoELoRALinear)}
    with torch.no_grad():
        for name, module in peft_model.lm.named_modules():
            if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.ModuleDict):
                leaf = name.split("base_model.model.")[-1]
                ours = next(m for n, m in moe_layers.items() if n.replace(".base_layer", "") == leaf)
                module.lora_B["default"].weight.normal_(std=0.05)
                ours.lora_A[0].copy_(module.lora_A["default"].weight)
                ours.lora_B[0].copy_(module.lora_B["default"].weight)
    batch = make_batch(moe, tokenizer)
    out_moe, out_peft = moe(batch).hidden_states, peft_model(batch).hidden_states
    torch.testing.assert_close(out_moe, out_peft, rtol=1e-5, atol=1e-5)
    out_moe.square().sum().backward()
    out_peft.square().sum().backward()
    grads = {n.replace(".base_layer", ""): m.lora_B.grad[0] for n, m in moe_layers.items()}
    for name, module in peft_model.lm.named_modules():
        if hasattr(module, "lora_B") and isinstance(module.lora_B, torch.nn.ModuleDict):
            torch.testing.assert_close(grads[name.split("base_model.model.")[-1]], module.lora_B["default"].weight.grad,
                                       rtol=1e-4, atol=1e-6)


def test_eval_routing_is_deterministic_and_training_jitter_repeats_per_step(demo_data, tmp_path):
    from llava_train.model.context import RunState

    _, model, tokenizer = built(moe_recipe(demo_data, tmp_path, jitter=0.5, top_k=1))
    randomise_b(model, 0.5)
    batch = make_batch(model, tokenizer)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(batch).hidden_states, model(batch).hidden_states)
        model.train()
        model.run_state = RunState(seed=0, step=3)
        first, again = model(batch).hidden_states, model(batch).hidden_states
        model.run_state = RunState(seed=0, step=4)
        later = model(batch).hidden_states
    assert torch.equal(first, again) and not torch.equal(first, later)


def test_combines_with_plain_lora_on_attention(demo_data, tmp_path):
    stage = {"name": "sft_lora", "lora": {"r": 2, "alpha": 4, "dropout": 0.0,
                                          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
    recipe, model, _ = built(moe_recipe(demo_data, tmp_path, stage=stage))
    apply_stage(model, recipe.stage)
    release_module_parameters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in n for n in trainable) and any("mlp" in n and "lora_A" in n for n in trainable)
    assert not any(n.endswith("gate_proj.base_layer.weight") for n in trainable)
    result = Trainer(validate_recipe(moe_recipe(demo_data, tmp_path / "run", stage=stage))).train()
    assert result.step == 4


def test_trains_resumes_exactly_and_exports_as_declared(demo_data, tmp_path):
    def recipe(out, **train):
        r = moe_recipe(demo_data, out, jitter=0.1, top_k=2, z_loss_coef=1e-3)
        r["train"].update(train)
        r["model"]["gradient_checkpointing"] = True
        return validate_recipe(r)

    full = assert_resume_matches(recipe, tmp_path)
    row = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    loads = [row[f"objective/moe/load/layer0/expert{e}"] for e in range(3)]
    assert sum(loads) == pytest.approx(1.0) and "aux/moe_lora/balance" in row and "aux/moe_lora/z_loss" in row
    out = export_checkpoint(full.checkpoint, tmp_path / "export")  # E = 3: the llava_train format
    assert (out / "llava_train_model.json").is_file() and not (out / "config.json").exists()


def test_one_expert_merges_on_export(demo_data, tmp_path):
    from transformers import LlavaForConditionalGeneration

    result = Trainer(validate_recipe(moe_recipe(demo_data, tmp_path / "run", experts=1, rank=2))).train()
    model, tokenizer = load_model_files(result.checkpoint)
    batch = make_batch(model, tokenizer)
    export_checkpoint(result.checkpoint, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ours = model.output_embeddings(model(batch).hidden_states)
        theirs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    torch.testing.assert_close(theirs.logits, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_two_ranks_zero3_each_routing_to_its_own_expert_match_one(demo_data, tmp_path):
    """ZeRO-3 with the persistence threshold 0 (every parameter partitioned): rank 0 sends every token to
    expert 0, rank 1 to expert 1; the single-process run routes each sample as the rank that held it did."""
    from tests.test_distributed import launch

    preset = json.loads((REPO / "launch" / "ds_zero3.json").read_text())
    preset["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3_all_partitioned.json").write_text(json.dumps(preset))

    def recipe(out, micro, zero):
        # No balance loss here: it is computed per micro-batch (as Switch and MoE-LLaVA do), so a rank whose
        # tokens all go to one expert sees another balance term than one process holding both halves.
        r = moe_recipe(demo_data, out / "out", experts=2, rank=4, top_k=1, balance_coef=0.0)
        r["plugins"] = ["tests.moe_forced_routing"]
        r["train"].update(max_steps=3, micro_batch_size=micro, zero_stage=zero, log_every=1)
        if zero == 3:
            r["train"]["deepspeed_config"] = str(tmp_path / "zero3_all_partitioned.json")
        return r

    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    os.environ.update(MOE_ROUTE_BY_RANK="1", MOE_KEYS_DIR=str(keys_dir))
    try:
        two = launch(recipe(tmp_path / "two", 4, 3), tmp_path / "two", nproc=2)
    finally:
        del os.environ["MOE_ROUTE_BY_RANK"], os.environ["MOE_KEYS_DIR"]
    mapping = {key: rank for rank in (0, 1) for key in json.loads((keys_dir / f"rank{rank}.json").read_text())}
    assert len(mapping) == 3 * 8  # every sample of the 3 global batches, each on exactly one rank
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    os.environ["MOE_ROUTE_MAP"] = str(tmp_path / "map.json")
    try:
        one = launch(recipe(tmp_path / "one", 8, 0), tmp_path / "one", nproc=1)
    finally:
        del os.environ["MOE_ROUTE_MAP"]
    assert sorted(two) == [1, 2, 3]
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-4), step
