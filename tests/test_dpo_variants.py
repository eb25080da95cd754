"""Dense DPO (RLHF-V token weights) and mDPO (corrupted-image conditional term + anchor) in the `dpo` objective,
against hand-computed values and a naive full-logits computation on real pair batches."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from llava_train.data.batch import IGNORE_INDEX
from llava_train.model.context import RunState
from llava_train.objectives import BuildContext, build_objective
from llava_train.objectives.dpo import pair_indices
from llava_train.objectives.preference import crop_box, diff_changed, diff_token_weights, sequence_scores
from llava_train.recipe import validate_recipe
from llava_train.train.trainer import Trainer
from tests.test_dpo import dpo_recipe, randomise_lora_b
from tests.test_groups import pair_shards  # noqa: F401  (a fixture: convert-pairs output)

BETA = 0.1


@pytest.fixture(scope="module")
def policy(demo_data, pair_shards, tmp_path_factory):  # noqa: F811
    """A LoRA policy whose B is drawn at random (so it differs from its adapters-disabled reference), and a
    micro-batch of 4 pairs, 3 of them with an image."""
    trainer = Trainer(validate_recipe(dpo_recipe(demo_data, tmp_path_factory.mktemp("dpo_variants"), pair_shards)))
    randomise_lora_b(trainer.model)
    batch = next(iter(trainer.loader))
    assert batch.pixel_values is not None and batch.num_groups == 4
    return trainer, batch


def objective(trainer, **options):
    build = BuildContext(trainer.recipe, trainer.tokenizer, trainer.model)
    return build_objective({"type": "dpo", "beta": BETA, **options}, build)


def grads_of(loss, model) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def naive_token_logps(model, batch) -> list[torch.Tensor]:
    """Full [tokens, vocab] log-softmax: each sample's response-token log-probs, in order."""
    hidden = model(batch).hidden_states[:, :-1]
    logp = F.log_softmax(hidden @ model.output_embeddings.weight.T, dim=-1)
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    values = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep]
    owner = batch.sequence_ids[:, :-1][keep]
    return [values[owner == s] for s in range(batch.num_samples)]


def naive_ratios(model, batch, weights=None, mean=False) -> torch.Tensor:
    """log pi - log pi_ref per sample (weighted sums, or weighted means)."""
    policy = naive_token_logps(model, batch)
    with torch.no_grad(), model.adapters_disabled():
        reference = naive_token_logps(model, batch)
    weights = weights or [torch.ones_like(p) for p in policy]

    def score(values, w):
        return (w * values).sum() / (w.sum() if mean else 1)

    return torch.stack([score(p, w) - score(r, w) for p, r, w in zip(policy, reference, weights)])


# ----------------------------------------------------------------------------- dense DPO


def test_the_diff_marks_exactly_the_edited_tokens():
    assert diff_changed([1, 2, 3, 4, 5], [1, 2, 9, 4, 5]) == ([False, False, True, False, False],) * 2
    assert diff_changed([1, 2, 3], [1, 2, 7, 8, 3]) == ([False] * 3, [False, False, True, True, False])
    assert diff_changed([4, 5, 6], [4, 6]) == ([False, True, False], [False, False])
    tokens = [[1, 2, 3, 4], [1, 2, 9, 4], [7, 7]]
    assert diff_token_weights(tokens, [0], [1], gamma=5.0) == [[1, 1, 5, 1], [1, 1, 5, 1], [1.0, 1.0]]


def test_dense_scores_against_hand_computed_values():
    logps = torch.tensor([-1.0, -2.0, -3.0, -0.5, -0.25])
    sample = torch.tensor([0, 0, 0, 1, 1])
    weights = torch.tensor([1.0, 5.0, 1.0, 5.0, 1.0])
    # sum: -1 - 10 - 3 = -14 and -2.5 - 0.25 = -2.75; average mode divides by the weights' sums 7 and 6
    torch.testing.assert_close(sequence_scores(logps, sample, weights, 2, mean=False), torch.tensor([-14.0, -2.75]))
    torch.testing.assert_close(sequence_scores(logps, sample, weights, 2, mean=True), torch.tensor([-2.0, -2.75 / 6]))


def test_dense_with_gamma_one_equals_dpo(policy):
    trainer, batch = policy
    plain, _, _ = objective(trainer).terms(trainer.model, batch)
    dense, _, _ = objective(trainer, dense={"gamma": 1.0}).terms(trainer.model, batch)
    torch.testing.assert_close(dense["preference"], plain["preference"].detach())
    expected = grads_of(plain["preference"].sum(), trainer.model)
    for name, grad in grads_of(dense["preference"].sum(), trainer.model).items():
        torch.testing.assert_close(grad, expected[name], msg=name)


@pytest.mark.parametrize("mean", [False, True])
def test_dense_loss_equals_the_naive_weighted_loss(policy, mean):
    trainer, batch = policy
    gamma = 5.0
    terms, _, _ = objective(trainer, dense={"gamma": gamma}, average_logprobs=mean).terms(trainer.model, batch)
    chosen, rejected = pair_indices(batch)
    tokens = [[t for t in row if t != IGNORE_INDEX] for row in batch.labels[:, 1:].tolist()]  # one sample per row
    weights = [torch.tensor(w) for w in diff_token_weights(tokens, chosen.tolist(), rejected.tolist(), gamma)]
    assert any((w == gamma).any() for w in weights)  # the pairs' answers differ in some tokens
    with torch.no_grad():
        ratios = naive_ratios(trainer.model, batch, weights, mean)
    expected = -F.logsigmoid(BETA * (ratios[chosen] - ratios[rejected]))
    torch.testing.assert_close(terms["preference"].detach(), expected, rtol=1e-4, atol=1e-6)


def test_dense_weights_given_in_the_data(policy):
    trainer, batch = policy
    tokens = batch.labels[:, 1:] != IGNORE_INDEX
    meta = [{**m, "token_weights": {member: [2.0] * int(tokens[s].sum())}}
            for s, (m, member) in enumerate(zip(batch.meta, batch.group_members))]
    weighted = dataclasses.replace(batch, meta=meta)
    terms, _, _ = objective(trainer, dense={"weights": "data"}).terms(trainer.model, weighted)
    with torch.no_grad():
        ratios = naive_ratios(trainer.model, batch)
    chosen, rejected = pair_indices(batch)
    expected = -F.logsigmoid(BETA * 2.0 * (ratios[chosen] - ratios[rejected]))  # every weight 2: twice the margin
    torch.testing.assert_close(terms["preference"].detach(), expected, rtol=1e-4, atol=1e-6)
    short = [{**m, "token_weights": {"chosen": [1.0], "rejected": [1.0]}} for m in batch.meta]
    with pytest.raises(ValueError, match="token weights for .* response tokens"):
        objective(trainer, dense={"weights": "data"}).terms(trainer.model, dataclasses.replace(batch, meta=short))


# ----------------------------------------------------------------------------- mDPO


def test_the_crop_keeps_one_to_twenty_percent_of_the_area():
    generator = torch.Generator().manual_seed(0)
    fractions = [h * w / 224**2 for *_, h, w in (crop_box(224, 224, generator, 0.01, 0.2) for _ in range(200))]
    assert 0.009 < min(fractions) < 0.03 and 0.17 < max(fractions) < 0.21


def test_the_crop_is_drawn_from_seed_and_step_and_shared_by_a_pair(policy):
    trainer, batch = policy
    model, mdpo = trainer.model, objective(trainer, mdpo={})
    model.run_state = RunState(seed=0, step=3)
    first, again = mdpo.corrupt_images(model, batch), mdpo.corrupt_images(model, batch)
    model.run_state = RunState(seed=0, step=4)
    later = mdpo.corrupt_images(model, batch)
    model.run_state = RunState(seed=1, step=3)
    other_seed = mdpo.corrupt_images(model, batch)
    model.run_state = RunState()
    assert torch.equal(first, again) and not torch.equal(first, later) and not torch.equal(first, other_seed)
    assert not torch.equal(first, batch.pixel_values)
    owners = [span[3] for span in model.forward_context(batch).image_spans()]  # the sample of each image
    groups = [int(batch.group_index[s]) for s in owners]
    for i in range(len(groups)):
        for j in range(len(groups)):
            if groups[i] == groups[j]:  # a pair's chosen and rejected copies of its image: one crop
                assert torch.equal(first[i], first[j])


def test_policy_and_reference_see_the_same_corrupted_image(policy):
    trainer, batch = policy
    seen = []
    handle = trainer.model.vision.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    try:
        objective(trainer, mdpo={}).terms(trainer.model, batch)
    finally:
        handle.remove()
    # policy and reference on the real images, then policy and reference on the corrupted ones
    assert len(seen) == 4 and torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    assert not torch.equal(seen[0], seen[2])


def test_mdpo_with_an_identity_corruption_gives_ln2_and_no_gradient(policy, monkeypatch):
    trainer, batch = policy
    mdpo = objective(trainer, mdpo={})
    monkeypatch.setattr(mdpo, "corrupt_images", lambda model, batch: batch.pixel_values)
    terms, _, _ = mdpo.terms(trainer.model, batch)
    chosen, _ = pair_indices(batch)
    has_image = torch.tensor([bool((batch.input_ids[c] == trainer.model.image_token_id).any()) for c in chosen])
    torch.testing.assert_close(terms["conditional"].detach(), has_image.float() * math.log(2))
    for name, grad in grads_of(terms["conditional"].sum(), trainer.model).items():
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-7, rtol=0, msg=name)


def test_mdpo_terms_equal_the_naive_terms(policy):
    trainer, batch = policy
    model, anchor = trainer.model, 0.3
    mdpo = objective(trainer, mdpo={"anchor": anchor})
    model.run_state = RunState(seed=0, step=2)
    terms, metrics, _ = mdpo.terms(model, batch)
    corrupted = dataclasses.replace(batch, pixel_values=mdpo.corrupt_images(model, batch))
    model.run_state = RunState()
    chosen, rejected = pair_indices(batch)
    with torch.no_grad():
        real, crop = naive_ratios(model, batch), naive_ratios(model, corrupted)
    has_image = torch.tensor([bool((batch.input_ids[c] == model.image_token_id).any()) for c in chosen])
    conditional = -F.logsigmoid(BETA * (real[chosen] - crop[chosen])) * has_image
    expected = {"preference": -F.logsigmoid(BETA * (real[chosen] - real[rejected])), "conditional": conditional,
                "anchor": -F.logsigmoid(BETA * real[chosen] - anchor)}
    assert terms.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(terms[name].detach(), value, rtol=1e-4, atol=1e-6, msg=name)
    assert metrics["mdpo/anchor"] == pytest.approx(float(expected["anchor"].mean()), rel=1e-4)


def test_mdpo_runs_its_forwards_on_a_batch_without_images(policy):
    """ZeRO-3: every rank must run the same forwards, so a rank whose pairs have no image still runs mDPO's
    corrupted-image forwards (no conditional term, the anchor as usual)."""
    from llava_train.data.collate import collate_rows
    from tests.test_groups import encoder, pair_raw

    trainer, _ = policy
    members = encoder(trainer.tokenizer, visual=trainer.model.tokens_per_image)(
        pair_raw(prompt="What colour?", images=()))
    batch = collate_rows([[m] for m in members], trainer.tokenizer.pad_token_id, trainer.model.image_token_id)
    assert batch.pixel_values is None
    forwards = []
    handle = trainer.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        terms, _, _ = objective(trainer, mdpo={}).terms(trainer.model, batch)
    finally:
        handle.remove()
    assert len(forwards) == 4 and float(terms["conditional"].detach()) == 0.0
    with torch.no_grad():
        real = naive_ratios(trainer.model, batch)
    torch.testing.assert_close(terms["anchor"].detach(), -F.logsigmoid(BETA * real[:1]), rtol=1e-4, atol=1e-6)
