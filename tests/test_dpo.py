"""The `dpo` objective (llava_train/objectives/dpo.py) against its analytic values, on real pair shards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llava_train.objectives.dpo import preference_loss
from llava_train.recipe import RecipeError, validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.test_groups import pair_shards  # noqa: F401  (a fixture: convert-pairs output)


def dpo_recipe(demo_data, out, shards, objective=None, stage="sft_lora", **train) -> dict:
    recipe = tiny_recipe_dict(demo_data, out, **{"max_steps": 2, "lr": 1e-2, **train})
    recipe["stage"] = {"name": stage, "objective": {"type": "dpo", **(objective or {})},
                       "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "trainable": {"connector": False}}
    recipe["data"].update(train=[str(s) for s in shards], eval=[])
    return recipe


def randomise_lora_b(model, seed: int = 0, scale: float = 0.5) -> None:
    """LoRA B drawn at random, so that the policy differs from its adapters-disabled reference (at B = 0 they
    are equal and every margin is zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_loss_values():
    margin = torch.randn(16)
    torch.testing.assert_close(preference_loss(margin, 0.1, "robust", 0.0), preference_loss(margin, 0.1, "sigmoid"))
    zero = torch.zeros(3)
    torch.testing.assert_close(preference_loss(zero, 0.1, "sigmoid"), torch.full((3,), math.log(2)))
    torch.testing.assert_close(preference_loss(zero, 0.1, "ipo"), torch.full((3,), (1 / (2 * 0.1)) ** 2))
    torch.testing.assert_close(preference_loss(zero, 0.1, "hinge"), torch.ones(3))
    # the robust loss is the sigmoid loss of the margin and of its flip, mixed by eps
    mixed = 0.8 * preference_loss(margin, 0.1, "sigmoid") + 0.2 * preference_loss(-margin, 0.1, "sigmoid")
    torch.testing.assert_close(preference_loss(margin, 0.1, "robust", 0.2), mixed)


@pytest.mark.parametrize("loss,first", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_policy_equal_to_reference_gives_the_analytic_first_loss(demo_data, tmp_path, pair_shards, loss, first):  # noqa: F811
    """LoRA's B starts at zero, so at step 1 the policy equals its adapters-disabled reference: margins and
    rewards are zero, the loss is ln 2 (sigmoid) or (1/(2 beta))^2 (IPO) per pair; then the policy learns."""
    recipe = validate_recipe(dpo_recipe(demo_data, tmp_path, pair_shards, {"loss": loss}, max_steps=4))
    Trainer(recipe).train()
    steps = rows(tmp_path)
    assert steps[0]["loss"] == pytest.approx(first, rel=1e-5)
    assert steps[0]["objective/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["normaliser/pairs"] == 4  # micro-batch 4 pairs: the loss is a mean over pairs
    assert steps[-1]["objective/rewards/accuracy"] > 0.5 and steps[-1]["loss"] < first


def test_needs_adapters_or_a_reference(demo_data, tmp_path, pair_shards):  # noqa: F811
    with pytest.raises(RecipeError, match="trains no adapters"):
        validate_recipe(dpo_recipe(demo_data, tmp_path, pair_shards, stage="sft"))


def test_an_adapters_disabled_reference_refuses_other_trainable_parts(demo_data, tmp_path, pair_shards):  # noqa: F811
    recipe = dpo_recipe(demo_data, tmp_path, pair_shards)
    recipe["stage"]["trainable"] = {"connector": True, "vision": True}
    with pytest.raises(RecipeError, match=r"also trains vision, connector, .*\{vision: false, connector: false\}"):
        validate_recipe(recipe)
    recipe["stage"]["objective"]["precomputed_reference"] = True  # a precomputed reference does not move
    validate_recipe(recipe)


def test_a_pairs_image_is_encoded_once_and_both_members_read_the_same_features(demo_data, tmp_path, pair_shards):  # noqa: F811
    """The tower sees each pair's image once; hidden states and the tower's gradients equal encoding every member's
    copy (the copies are equal pixels, so the features are the same function of them)."""
    from llava_train.data.batch import Batch

    trainer = Trainer(validate_recipe(dpo_recipe(demo_data, tmp_path, pair_shards, micro_batch_size=6)))
    model = trainer.model
    batch = next(iter(trainer.loader))
    assert batch.pixel_values is not None and batch.pixel_values.shape[0] > batch.num_groups - 1
    model.vision.requires_grad_(True)
    seen, results = [], {}
    hook = model.vision.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    for shared in (True, False):
        model.zero_grad(set_to_none=True)
        seen.clear()
        with pytest.MonkeyPatch.context() as patch:
            if not shared:
                patch.setattr(Batch, "image_copies", lambda self: None)
            hidden = model(batch).hidden_states
            hidden.float().square().mean().backward()
        results[shared] = (hidden.detach(), {n: p.grad.clone() for n, p in model.vision.named_parameters() if p.grad is not None},
                           seen[0])  # fmt: skip
    hook.remove()
    (shared_hidden, shared_grads, shared_images), (plain_hidden, plain_grads, plain_images) = results[True], results[False]
    assert plain_images == batch.pixel_values.shape[0] and shared_images == plain_images // 2  # one per pair
    torch.testing.assert_close(shared_hidden, plain_hidden, rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_ranks_times_two_pairs_equal_one_rank_times_four(demo_data, tmp_path, pair_shards):  # noqa: F811
    from tests.test_distributed import launch

    single = launch(dpo_recipe(demo_data, tmp_path / "one" / "out", pair_shards, max_steps=3, micro_batch_size=4),
                    tmp_path / "one", nproc=1)
    two = launch(dpo_recipe(demo_data, tmp_path / "two" / "out", pair_shards, max_steps=3, micro_batch_size=2,
                            zero_stage=3), tmp_path / "two", nproc=2)
    for step, loss in single.items():
        assert two[step] == pytest.approx(loss, rel=1e-4), step
