"""Knowledge distillation (llava_train/objectives/kd/, kernels/distillation.py): the issue's invariants.

The divergences against their plain-autograd reference (values and gradients, chunk sizes that do not
divide N), the JSD endpoints, temperature; RDist's invariances; then the objective on the tiny model:
self-distillation, masking and normalisation, teacher hygiene, refusals, and two-rank ZeRO-3.
"""

from __future__ import annotations

import pytest
import torch

from kernels.distillation import DivergenceSpec, chunked_distillation, naive_distillation

N, D, V = 37, 24, 101
UPSTREAM = 0.37  # a gradient of 1.0 would hide scaling bugs


def inputs(seed=0, n=N, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=gen).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / D**0.5).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).requires_grad_() if bias else None
    teacher = torch.randn(n, V, generator=gen) * 2
    return hidden, weight, b, teacher


def grads(loss, tensors):
    return torch.autograd.grad(loss * UPSTREAM, [t for t in tensors if t is not None])


SPECS = [
    DivergenceSpec("forward_kl"),
    DivergenceSpec("reverse_kl"),
    DivergenceSpec("jsd", beta=0.3),
    DivergenceSpec("jsd", beta=0.9, temperature=2.0, scale_t2=True),
    DivergenceSpec("skew_forward_kl", skew=0.1),
    DivergenceSpec("skew_reverse_kl", skew=0.3, temperature=0.5),
    DivergenceSpec("forward_kl", temperature=3.0, scale_t2=True),
    DivergenceSpec("forward_kl", top_k=7),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-b{s.beta}-T{s.temperature}-k{s.top_k}")
@pytest.mark.parametrize("chunk_size", [5, 16, 1000])
def test_chunked_equals_naive_values_and_gradients(spec, chunk_size):
    hidden, weight, b, teacher = inputs()
    got = chunked_distillation(hidden, weight, lambda rows: teacher[rows], spec, bias=b, chunk_size=chunk_size)
    want = naive_distillation(hidden, weight, teacher, spec, bias=b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads(got, (hidden, weight, b)), grads(want, (hidden, weight, b))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_student_equal_to_teacher_gives_zero_divergence_and_gradient(kind):
    hidden, weight, b, _ = inputs()
    teacher = (hidden @ weight.T + b).detach()
    loss = chunked_distillation(hidden, weight, lambda rows: teacher[rows], DivergenceSpec(kind), bias=b, chunk_size=8)
    assert abs(float(loss.detach())) < 1e-4
    for g in grads(loss, (hidden, weight, b)):
        assert g.abs().max() < 1e-5


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    hidden, weight, b, teacher = inputs()
    run = lambda spec: chunked_distillation(hidden, weight, lambda r: teacher[r], spec, bias=b, chunk_size=8)  # noqa: E731
    assert torch.equal(run(DivergenceSpec("jsd", beta=0.0)), run(DivergenceSpec("forward_kl")))
    assert torch.equal(run(DivergenceSpec("jsd", beta=1.0)), run(DivergenceSpec("reverse_kl")))
    # inside (0, 1) it is a different, smaller, symmetric-ish divergence, not either end
    mid = run(DivergenceSpec("jsd", beta=0.5))
    assert 0 < mid < min(run(DivergenceSpec("forward_kl")), run(DivergenceSpec("reverse_kl")))


def test_temperature_one_is_no_scaling_and_t2_scales_exactly():
    hidden, weight, b, teacher = inputs()
    run = lambda spec: chunked_distillation(hidden, weight, lambda r: teacher[r], spec, bias=b, chunk_size=8)  # noqa: E731
    assert torch.equal(run(DivergenceSpec(temperature=1.0, scale_t2=True)), run(DivergenceSpec()))
    plain, scaled = run(DivergenceSpec(temperature=2.5)), run(DivergenceSpec(temperature=2.5, scale_t2=True))
    torch.testing.assert_close(scaled, plain * 2.5**2)
    for g, w in zip(grads(scaled, (hidden, weight, b)), grads(plain, (hidden, weight, b))):
        torch.testing.assert_close(g, w * 2.5**2)


def test_top_k_with_every_token_is_forward_kl():
    hidden, weight, b, teacher = inputs()
    full = chunked_distillation(hidden, weight, lambda r: teacher[r], DivergenceSpec(), bias=b, chunk_size=8)
    topv = chunked_distillation(hidden, weight, lambda r: teacher[r], DivergenceSpec(top_k=V), bias=b, chunk_size=8)
    torch.testing.assert_close(topv, full)


# ----------------------------------------------------------------------------- RDist


from llava_train.objectives.kd import relation  # noqa: E402


def test_rdist_is_zero_on_identical_features_and_scale_and_permutation_invariant():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 9, 16, generator=gen), torch.randn(3, 9, 40, generator=gen)  # widths differ
    loss = lambda s, t: relation.relation_loss(relation.gram(s), relation.gram(t))  # noqa: E731
    torch.testing.assert_close(loss(student, student), torch.zeros(3), atol=1e-6, rtol=0)
    base = loss(student, teacher)
    assert (base > 1e-3).all()
    torch.testing.assert_close(loss(3.0 * student, 0.5 * teacher), base)
    perm = torch.randperm(9, generator=gen)
    torch.testing.assert_close(loss(student[:, perm], teacher[:, perm]), base)


def test_logits_gram_equals_the_gram_of_full_logits():
    gen = torch.Generator().manual_seed(2)
    hidden, weight, bias = torch.randn(2, 7, 12, generator=gen), torch.randn(50, 12, generator=gen), torch.randn(50, generator=gen)
    want = relation.gram(hidden @ weight.T + bias)
    torch.testing.assert_close(relation.logits_gram(hidden, weight, bias), want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(relation.logits_gram(hidden, weight), relation.gram(hidden @ weight.T), rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- the objective on the tiny model

import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from llava_train.data.batch import IGNORE_INDEX, Batch, TokenRole  # noqa: E402
from llava_train.objectives.kd.teacher_batch import teacher_batch  # noqa: E402
from llava_train.recipe import RecipeError, validate_recipe  # noqa: E402
from llava_train.train.trainer import Trainer  # noqa: E402
from tests.conftest import TINY_LM, TINY_VISION, tiny_recipe_dict  # noqa: E402


def kd_recipe(demo_data, out, teacher, objective=None, stage="sft", init_from=None, **train) -> dict:
    recipe = tiny_recipe_dict(demo_data, out, **{"max_steps": 2, "lr": 1e-2, **train})
    recipe["stage"] = {"name": stage, "init_from": init_from,
                       "objective": {"type": "kd", "teacher": str(teacher), **(objective or {})}}
    recipe["data"]["eval"] = []
    return recipe


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def teacher_checkpoint(demo_data, tmp_path_factory):
    """A trained tiny model (the student's architecture) to distil from."""
    recipe = tiny_recipe_dict(demo_data, tmp_path_factory.mktemp("teacher"), max_steps=2, lr=1e-2)
    recipe["data"]["eval"] = []
    return Trainer(validate_recipe(recipe)).train().checkpoint


@pytest.fixture(scope="module")
def small_tower_teacher(demo_data, tmp_path_factory):
    """A teacher whose tower emits 4 tokens per image (patch 16), the student's 16 (patch 8), and a wider LM."""
    recipe = tiny_recipe_dict(demo_data, tmp_path_factory.mktemp("teacher4"), max_steps=1)
    recipe["model"]["vision"]["config"]["patch_size"] = 16
    recipe["model"]["lm"]["config"].update(hidden_size=96, intermediate_size=192)
    recipe["data"]["eval"] = []
    return Trainer(validate_recipe(recipe)).train().checkpoint


@pytest.mark.parametrize("level", ["logits", "hidden", "projector"])
def test_self_distillation_gives_zero_divergence_and_zero_gradient(demo_data, tmp_path, teacher_checkpoint, level):
    """The student starts as the teacher: every KD term and its gradient is zero (CE off)."""
    options = {"ce_weight": 0.0, "rdist_level": level}
    recipe = kd_recipe(demo_data, tmp_path, teacher_checkpoint, options, init_from=str(teacher_checkpoint), max_steps=1)
    Trainer(validate_recipe(recipe)).train()
    first = rows(tmp_path)[0]
    assert first["objective/mdist"] == pytest.approx(0, abs=1e-6)
    assert first["aux/kd_visual_mdist"] == pytest.approx(0, abs=1e-6)
    assert first["aux/kd_rdist"] == pytest.approx(0, abs=1e-5)
    assert first["grad_norm"] < 1e-5 and first["objective/ce"] > 1  # CE would not be zero: it is off


def test_teacher_never_trains_never_saves_and_stays_out_of_the_optimizer(demo_data, tmp_path, teacher_checkpoint):
    trainer = Trainer(validate_recipe(kd_recipe(demo_data, tmp_path, teacher_checkpoint)))
    teacher = trainer.objective.frozen["teacher"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(not p.requires_grad and id(p) not in in_optimizer for p in teacher.parameters())
    result = trainer.train()
    trainer.engine.train()
    assert not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    saved = load_file(str(result.checkpoint / "model" / "model.safetensors"))
    assert saved.keys() == set(trainer.model.state_dict())  # the student only
    engine_state = torch.load(result.checkpoint / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)
    assert engine_state["module"] and not [k for k in engine_state["module"] if "teacher" in k]  # nor DeepSpeed's
    resumed = kd_recipe(demo_data, tmp_path, teacher_checkpoint, max_steps=3, resume=str(result.checkpoint))
    assert Trainer(validate_recipe(resumed)).train().step == 3  # the teacher comes back from its own files
    steps = rows(tmp_path)
    assert steps[0]["objective/mdist"] > 0 and steps[-1]["objective/mdist"] < steps[0]["objective/mdist"]
    for term in ("objective/ce", "aux/kd_visual_mdist", "aux/kd_rdist"):  # each term logged on its own
        assert term in steps[0]


def _rows_of(batch: Batch, rows: slice) -> Batch:
    """Rows of an unpacked batch as a batch of their own (their images, sample ids from 0)."""
    images = (batch.image_sample_index >= rows.start) & (batch.image_sample_index < rows.stop)
    cut = lambda t: t[rows]  # noqa: E731
    return dataclasses.replace(
        batch, input_ids=cut(batch.input_ids), labels=cut(batch.labels), attention_mask=cut(batch.attention_mask),
        token_roles=cut(batch.token_roles), position_ids=cut(batch.position_ids),
        sequence_ids=cut(batch.sequence_ids).clamp(min=-1) - rows.start * (cut(batch.sequence_ids) >= 0),
        pixel_values=batch.pixel_values[images], image_sample_index=batch.image_sample_index[images] - rows.start,
        keys=batch.keys[rows], meta=batch.meta[rows], group_index=batch.group_index[rows], group_members=batch.group_members[rows],
    )


def _padded(batch: Batch, extra: int, pad_id: int) -> Batch:
    """The batch with `extra` more padding columns."""
    def pad(t, value):
        return torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype)], dim=1)
    return dataclasses.replace(
        batch, input_ids=pad(batch.input_ids, pad_id), labels=pad(batch.labels, IGNORE_INDEX),
        attention_mask=pad(batch.attention_mask, 0), token_roles=pad(batch.token_roles, int(TokenRole.PAD)),
        position_ids=pad(batch.position_ids, 0), sequence_ids=pad(batch.sequence_ids, -1),
    )


def test_micro_batches_sum_to_the_big_batch_and_padding_is_masked(demo_data, tmp_path, teacher_checkpoint):
    """Response terms are sums over supervised tokens: two halves of a batch add up to the whole, extra
    padding changes nothing, and the count is the supervised tokens (what the trainer normalises by)."""
    trainer = Trainer(validate_recipe(kd_recipe(demo_data, tmp_path, teacher_checkpoint, micro_batch_size=8)))
    batch = next(iter(trainer.loader))
    objective, model = trainer.objective, trainer.model
    whole = objective(model, batch)
    halves = [objective(model, _rows_of(batch, slice(a, a + 4))) for a in (0, 4)]
    torch.testing.assert_close(whole.loss_sum, halves[0].loss_sum + halves[1].loss_sum, rtol=1e-5, atol=1e-5)
    assert whole.count == halves[0].count + halves[1].count == batch.num_supervised_tokens
    padded = objective(model, _padded(batch, 5, trainer.tokenizer.pad_token_id))
    torch.testing.assert_close(padded.loss_sum, whole.loss_sum, rtol=1e-5, atol=1e-5)
    for name in ("kd_visual_mdist", "kd_rdist"):
        torch.testing.assert_close(padded.aux_losses[name], whole.aux_losses[name], rtol=1e-5, atol=1e-6)


def test_a_teacher_with_another_visual_token_count_reads_the_same_text(demo_data, tmp_path, teacher_checkpoint):
    trainer = Trainer(validate_recipe(kd_recipe(demo_data, tmp_path, teacher_checkpoint, micro_batch_size=4)))
    batch = next(iter(trainer.loader))
    image_id, pad_id = trainer.model.image_token_id, trainer.tokenizer.pad_token_id
    rebuilt = teacher_batch(batch, 16, 4, 16, pad_id, image_id)
    assert rebuilt.pixel_values.shape[-1] == 16 and int((rebuilt.token_roles == int(TokenRole.IMAGE)).sum()) == 4 * len(batch.pixel_values)
    ours, theirs = batch.labels[:, 1:], rebuilt.labels[:, 1:]
    assert torch.equal(ours[ours != IGNORE_INDEX], theirs[theirs != IGNORE_INDEX])  # response positions align, in order
    text = lambda b: b.input_ids[b.token_roles == int(TokenRole.TEXT)]  # noqa: E731
    assert torch.equal(text(batch), text(rebuilt))


def test_a_teacher_trained_on_other_image_statistics_reads_pixels_in_its_own(demo_data, tmp_path, teacher_checkpoint):
    """A teacher whose tower was trained with SigLIP's mean/std gets the student's pixels renormalised: exactly
    what its own preprocessing makes of the image."""
    from PIL import Image

    from llava_train.data.images import ImageProcessor
    from llava_train.objectives.kd.teacher_batch import PixelMap

    teacher = tmp_path / "siglip_stats_teacher"
    shutil.copytree(teacher_checkpoint, teacher)
    theirs = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), mode="pad")
    theirs.save_pretrained(teacher / "model" / "vision")
    trainer = Trainer(validate_recipe(kd_recipe(demo_data, tmp_path / "run", teacher, micro_batch_size=4)))
    ours = trainer.image_processor  # what the student's pixels went through
    assert trainer.objective.pixel_map == PixelMap.between(ours, theirs) is not None
    # Square: a padded non-square image differs in its pad colour (each side pads with its own mean; docs)
    image = Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy())
    torch.testing.assert_close(trainer.objective.pixel_map(ours(image)), theirs(image), rtol=0, atol=1e-5)
    seen = []
    handle = trainer.objective.teacher.vision.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    batch = next(iter(trainer.loader))
    trainer.objective(trainer.model, batch)
    handle.remove()
    torch.testing.assert_close(seen[0], trainer.objective.pixel_map(batch.pixel_values))


def test_an_exported_transformers_llava_folder_is_a_teacher(demo_data, tmp_path, teacher_checkpoint):
    """The same teacher as an exported Llava folder: its image settings are read from the folder (no
    renormalisation needed), and a student started from it distils to zero divergence."""
    from llava_train.model.export import export_checkpoint

    exported = export_checkpoint(teacher_checkpoint, tmp_path / "hf")
    options = {"ce_weight": 0.0}
    recipe = kd_recipe(demo_data, tmp_path / "run", exported, options, init_from=str(teacher_checkpoint), max_steps=1)
    trainer = Trainer(validate_recipe(recipe))
    assert trainer.objective.pixel_map is None
    trainer.train()
    assert rows(tmp_path / "run")[0]["objective/mdist"] == pytest.approx(0, abs=1e-5)


def test_response_only_kd_from_a_teacher_with_another_tower(demo_data, tmp_path, small_tower_teacher):
    options = {"visual_mdist_weight": 0.0, "rdist_weight": 0.0}
    Trainer(validate_recipe(kd_recipe(demo_data, tmp_path, small_tower_teacher, options))).train()
    steps = rows(tmp_path)
    assert all(0 < s["objective/mdist"] < 100 for s in steps)


def test_refusals_at_recipe_load(demo_data, tmp_path, teacher_checkpoint, small_tower_teacher):
    with pytest.raises(RecipeError, match="teacher emits 4 visual tokens per image, the student 16"):
        validate_recipe(kd_recipe(demo_data, tmp_path, small_tower_teacher))
    matryoshka = kd_recipe(demo_data, tmp_path, teacher_checkpoint)
    matryoshka["model"]["connector"] = {"type": "matryoshka_query", "options": {"num_queries": 8}}
    with pytest.raises(RecipeError, match="varying number of visual tokens"):
        validate_recipe(matryoshka)
    other_template = kd_recipe(demo_data, tmp_path, teacher_checkpoint)
    other_template["data"]["template"] = "plain"
    with pytest.raises(RecipeError, match="data.template=vicuna_v1"):
        validate_recipe(other_template)
    other_tokenizer = tmp_path / "teacher"
    shutil.copytree(teacher_checkpoint / "model", other_tokenizer)
    from llava_train.model.build import load_tokenizer

    tok = load_tokenizer(str(other_tokenizer / "tokenizer"))
    tok.add_tokens(["<not-in-the-student>"])
    tok.save_pretrained(other_tokenizer / "tokenizer")
    with pytest.raises(RecipeError, match="the teacher's tokenizer"):
        validate_recipe(kd_recipe(demo_data, tmp_path, other_tokenizer))
    with pytest.raises(RecipeError, match="neither a llava_train checkpoint"):
        validate_recipe(kd_recipe(demo_data, tmp_path, tmp_path))  # a folder, but no model files
    other_template["stage"]["objective"]["same_template"] = False  # meant (DPT distils on captions)
    validate_recipe(other_template)
    with pytest.raises(RecipeError, match="top_k needs divergence forward_kl"):
        validate_recipe(kd_recipe(demo_data, tmp_path, teacher_checkpoint, {"divergence": "jsd", "top_k": 5}))


def test_an_offloaded_teacher_streams_its_weights_and_gives_the_same_loss(demo_data, tmp_path, teacher_checkpoint):
    """Without ZeRO-3 an offloaded teacher sits outside the engine's module (which moves to the device whole):
    between forwards its blocks hold no weights (accelerate keeps them in CPU memory), its head stays resident, and
    every term equals the resident teacher's."""
    from llava_train.model.offload import with_param_offload

    outputs = {}
    for offload in (False, True):
        trainer = Trainer(validate_recipe(kd_recipe(demo_data, tmp_path / str(offload), teacher_checkpoint,
                                                    {"teacher_offload": offload}, micro_batch_size=4)))  # fmt: skip
        teacher = trainer.objective.teacher
        in_engine = any(p is q for p in teacher.parameters() for q in trainer.engine.module.parameters())
        assert in_engine != offload and ("teacher" in trainer.objective.frozen) != offload
        blocks = {p.device.type for part in (teacher.decoder.layers, teacher.vision) for p in part.parameters()}
        assert blocks == ({"meta"} if offload else {"cpu"})
        assert teacher.output_embeddings.weight.device.type == "cpu"  # the device here: resident
        batch = next(iter(trainer.loader))
        outputs[offload] = trainer.objective(trainer.model, batch)
    torch.testing.assert_close(outputs[True].loss_sum, outputs[False].loss_sum, rtol=1e-6, atol=1e-6)
    for name, value in outputs[False].aux_losses.items():
        torch.testing.assert_close(outputs[True].aux_losses[name], value, rtol=1e-6, atol=1e-6)
    config = {"zero_optimization": {"stage": 3}}
    assert with_param_offload(config)["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_param" not in config["zero_optimization"]  # a copy: the student's config is untouched


def test_on_policy_steps_distil_on_the_students_samples(demo_data, tmp_path, teacher_checkpoint):
    options = {"on_policy": 1.0, "max_new_tokens": 5}
    Trainer(validate_recipe(kd_recipe(demo_data, tmp_path, teacher_checkpoint, options, max_steps=2))).train()
    steps = rows(tmp_path)
    assert all("objective/on_policy_mdist" in s and "objective/ce" not in s for s in steps)
    assert all(0 < s["objective/on_policy_tokens"] <= 4 * 5 and s["loss"] > 0 for s in steps)


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True], ids=["teacher_on_device", "teacher_offloaded"])
def test_two_ranks_zero3_with_a_teacher_match_one(demo_data, tmp_path, teacher_checkpoint, offload):
    from tests.test_distributed import launch

    def recipe(out, micro, zero, offload=False):
        options = {"visual_mdist_weight": 0.0, "rdist_weight": 0.0,  # per-micro-batch means: not split-invariant
                   "teacher_offload": offload}  # fmt: skip
        return kd_recipe(demo_data, out / "out", teacher_checkpoint, options, max_steps=3, micro_batch_size=micro,
                         zero_stage=zero)

    single = launch(recipe(tmp_path / "one", 8, 0), tmp_path / "one", nproc=1)
    two = launch(recipe(tmp_path / "two", 4, 3, offload), tmp_path / "two", nproc=2)
    for step, loss in single.items():
        assert two[step] == pytest.approx(loss, rel=1e-4), step


@pytest.mark.slow
def test_on_policy_generation_under_two_rank_zero3_does_not_hang(demo_data, tmp_path, teacher_checkpoint):
    """Sampled completions end at different lengths on the two ranks; lockstep decoding keeps them together."""
    from tests.test_distributed import launch

    recipe = kd_recipe(demo_data, tmp_path / "out", teacher_checkpoint, {"on_policy": 1.0, "max_new_tokens": 8},
                       max_steps=2, micro_batch_size=2, zero_stage=3)
    losses = launch(recipe, tmp_path, nproc=2)
    assert sorted(losses) == [1, 2] and all(loss > 0 for loss in losses.values())


def test_on_policy_samples_stay_in_the_declared_shared_vocabulary(demo_data, tmp_path):
    """A teacher whose head covers only the tokenizer (the student's is padded to 1024 rows): distil over that
    slice, and sample on-policy completions from it too (a token the teacher lacks would index past its embeddings)."""
    from llava_train.objectives.kd.checks import example_teacher

    (tmp_path / "tokenizer").symlink_to(demo_data / "tokenizer", target_is_directory=True)
    teacher, vocabulary = example_teacher(tmp_path)
    assert vocabulary < TINY_LM["vocab_size"]
    options = {"vocab_slice": vocabulary, "on_policy": 1.0, "max_new_tokens": 6, "sample_temperature": 2.0}
    Trainer(validate_recipe(kd_recipe(demo_data, tmp_path / "run", teacher, options, max_steps=2))).train()
    assert all(s["objective/on_policy_tokens"] > 0 for s in rows(tmp_path / "run"))
