"""Visual-token budgets: a connector whose token count changes per step, through encoding, batching, packing,
the model and exact resume. The fixture connector (tests only) average-pools the 4x4 patch grid to 1, 4 or 16
tokens, the step's budget."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from llava_train.data import pipeline
from llava_train.data.batch import IGNORE_INDEX, Example, TokenRole
from llava_train.data.batching import BatchingConfig, PlannedBatch, plan, plan_window, row_length
from llava_train.data.collate import collate, collate_planned, collate_rows, relayout
from llava_train.data.encode import SampleEncoder
from llava_train.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from llava_train.data.templates import get_template
from llava_train.data.visual_tokens import VisualTokens
from llava_train.model.build import build_model, load_tokenizer
from llava_train.model.connectors import CONNECTORS, MLPConnector, register_connector
from llava_train.recipe import DataConfig, ModelConfig, validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import TINY_LM, TINY_VISION, tiny_recipe_dict
from tests.test_packing import grads, per_sample_losses

BUDGETS = (1, 4, 16)
SPEC = VisualTokens(full=16, budgets=BUDGETS, tokens=BUDGETS)


class PoolConnector(nn.Module):
    """Average-pools the square patch grid to `budget` tokens (a square number), then projects."""

    def __init__(self, vision_hidden: int, lm_hidden: int, num_features: int, budgets=BUDGETS, per_rank=False):
        super().__init__()
        self.grid = math.isqrt(num_features)
        assert self.grid**2 == num_features and all(math.isqrt(b) ** 2 == b for b in budgets)
        self.proj = nn.Linear(vision_hidden, lm_hidden)
        self.spec = VisualTokens(num_features, tuple(budgets), tuple(budgets), per_rank)
        self.num_output_tokens = num_features

    def visual_tokens(self) -> VisualTokens:
        return self.spec

    def forward(self, features: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        side = math.isqrt(self.spec.num_tokens(budget))
        grid = features.transpose(1, 2).reshape(features.shape[0], -1, self.grid, self.grid)
        return self.proj(F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2))


if "test_pool" not in CONNECTORS:
    register_connector("test_pool")(PoolConnector)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def png(colour=(200, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def raw(conversations, images=("png",)) -> dict:
    record = {"id": "x", "conversations": conversations, "images": list(images)}
    return {"__key__": "x", "__shard__": "s.tar", "json": record, **{ext: png() for ext in images}}


QA = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
TWO = QA + [{"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": "also red"}]


def encoder(tokenizer, visual, max_length=256) -> SampleEncoder:
    processor = ImageProcessor(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode="pad")
    return SampleEncoder(get_template("vicuna_v1", tokenizer), processor, visual, max_length)


# ----------------------------------------------------------------------------- (a) encoding and collate


def test_compact_spans_expand_to_what_a_fixed_count_encodes(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    compact = encoder(tokenizer, SPEC)(raw(TWO, images=("0.png", "1.png")))
    assert compact.input_ids.count(image_id) == 2 and len(compact.image_slots) == 2
    assert all(compact.labels[slot] == IGNORE_INDEX for slot in compact.image_slots)
    for n in BUDGETS:
        fixed = encoder(tokenizer, n)(raw(TWO, images=("0.png", "1.png")))
        assert fixed.image_slots == ()
        assert compact.expanded(n) == (fixed.input_ids, fixed.labels) and compact.len_at(n) == len(fixed)


def test_collate_expands_for_each_micro_batch_budget_packed_and_unpacked(tokenizer):
    image_id, pad = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id
    one, two = encoder(tokenizer, SPEC)(raw(QA)), encoder(tokenizer, SPEC)(raw(TWO, images=("0.png", "1.png")))
    text = Example([5, 6, 7], [5, 6, 7], key="t")
    for budget in (16, 1, 4):  # the budget changes from one micro-batch to the next
        n = SPEC.num_tokens(budget)
        unpacked = collate_planned(PlannedBatch([[one], [two], [text]], budget, n), pad, image_id)
        packed = collate_planned(PlannedBatch([[one, text], [two]], budget, n), pad, image_id)
        for batch, order in ((unpacked, [one, two, text]), (packed, [one, text, two])):
            assert batch.visual_budget == budget and batch.pixel_values.shape[0] == 3
            roles = batch.token_roles == int(TokenRole.IMAGE)
            assert int(roles.sum()) == 3 * n
            assert int((batch.input_ids == image_id).sum()) == 3 * n and int(batch.labels[roles].ne(-100).sum()) == 0
            for sample, example in enumerate(order):
                ids = batch.input_ids[batch.sequence_ids == sample].tolist()
                assert ids == example.expanded(n)[0]  # each sample's tokens, expanded, in place
                positions = batch.position_ids[batch.sequence_ids == sample].tolist()
                assert positions == list(range(example.len_at(n)))
        assert packed.input_ids.shape[1] == max(one.len_at(n) + 3, two.len_at(n))
        # packed: the text sample's first label is not learnt from the image sample before it
        assert packed.labels[0, one.len_at(n)] == IGNORE_INDEX
        # the image spans sit where the compact slots were
        starts = [i for i in range(packed.input_ids.shape[1]) if packed.input_ids[1, i] == image_id]
        assert starts[0] == two.image_slots[0] and starts[n] == two.image_slots[1] + n - 1


def test_truncation_plans_for_the_largest_count_and_never_cuts_a_span(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    full = encoder(tokenizer, SPEC)(raw(TWO, images=("0.png", "1.png")))
    inside_second = full.image_slots[1] + 15 + 8  # inside the second span at 16 tokens per image
    cut = encoder(tokenizer, SPEC, max_length=inside_second)(raw(TWO, images=("0.png", "1.png")))
    assert len(cut.images) == 1 and cut.input_ids.count(image_id) == 1
    assert cut.len_at(SPEC.max_tokens) <= inside_second  # no budget can exceed max_length
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]


# ----------------------------------------------------------------------------- (b) packed == unpacked


def make_model(tokenizer):
    cfg = ModelConfig(
        vision={"config": dict(TINY_VISION)}, lm={"config": dict(TINY_LM)}, tokenizer="unused",
        connector={"type": "test_pool"},
    )
    torch.manual_seed(0)
    return build_model(cfg, tokenizer).float().train()


def compact_examples(model, tokenizer) -> list[Example]:
    torch.manual_seed(1)
    image = model.image_token_id

    def text(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    def sample(key, prompt, answer, images=0):
        ids = [image] * images + text(prompt) + text(answer)
        labels = [IGNORE_INDEX] * (len(ids) - len(text(answer))) + text(answer)
        pixels = [torch.randn(3, 32, 32) for _ in range(images)]
        return Example(ids, labels, images=pixels, key=key, image_slots=tuple(range(images)))

    return [
        sample("a", "what colour is it?", "a red circle on the left", images=1),
        sample("b", "a question without an image", "an answer"),
        sample("c", "count them", "three", images=2),
        sample("d", "shape?", "square", images=1),
    ]


@pytest.mark.parametrize("budget", [1, 16])
def test_packed_rows_give_the_unpacked_losses_and_gradients_at_each_budget(tokenizer, budget):
    model = make_model(tokenizer)
    for p in model.parameters():
        p.requires_grad_(True)
    examples = compact_examples(model, tokenizer)
    at = {"tokens_per_image": SPEC.num_tokens(budget), "visual_budget": budget}
    pad, image_id = tokenizer.pad_token_id, model.image_token_id
    packed = collate_rows([examples[:2], examples[2:]], pad, image_id, **at)
    assert packed.packed and int((packed.token_roles == int(TokenRole.IMAGE)).sum()) == 4 * budget
    single = [per_sample_losses(model, collate([e], pad, image_id, **at)) for e in examples]
    alone, together = torch.cat(single), per_sample_losses(model, packed)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    reference, got = grads(model, alone.sum()), grads(model, together.sum())
    assert reference.keys() == got.keys() and any(n.startswith("connector.") for n in got)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    # the budget reaches the connector: another budget gives other losses
    other = collate_rows([examples[:2], examples[2:]], pad, image_id, tokens_per_image=4, visual_budget=4)
    assert not torch.allclose(per_sample_losses(model, other), together)


@pytest.mark.parametrize("rows", [[[0], [1], [2], [3]], [[0, 1], [2, 3]], [[2, 0, 1], [3]]], ids=["unpacked", "packed", "packed3"])
def test_relayout_gives_the_batch_collate_makes_at_the_other_budget(tokenizer, rows):
    model = make_model(tokenizer)
    examples = compact_examples(model, tokenizer)  # "c" has two images back to back: spans abut
    rows = [[examples[i] for i in row] for row in rows]
    pad, image_id = tokenizer.pad_token_id, model.image_token_id
    for old, new in ((16, 4), (16, 1), (4, 16), (1, 1)):
        source = collate_rows(rows, pad, image_id, tokens_per_image=old, visual_budget=old)
        expected = collate_rows(rows, pad, image_id, tokens_per_image=new, visual_budget=new)
        got = relayout(source, old, new, new, pad)
        for name, value in vars(expected).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(getattr(got, name), value), (old, new, name)
            else:
                assert getattr(got, name) == value, (old, new, name)
    with pytest.raises(ValueError, match="has 4 image tokens, not 4 images x 4"):
        relayout(source, 4, 1, 1, pad)


# ----------------------------------------------------------------------------- (d) token budgets per step


def compact(i: int) -> Example:
    return Example([1] * 10 + [9], [1] * 11, images=[torch.zeros(3, 2, 2)], key=f"s{i:02d}", image_slots=(10,))


def test_token_budget_batching_uses_the_step_count():
    window = [compact(i) for i in range(40)]
    cfg = BatchingConfig(micro_batch_size=4, max_tokens_per_batch=104, window=40)
    steps = [1, 16, 16, 1, 4]

    def budget_of(i):
        return steps[i % len(steps)]

    batches = plan_window(window, cfg, random.Random(0), budget_of, SPEC.num_tokens)
    assert sorted(e.key for b in batches for row in b for e in row) == [e.key for e in window]
    for i, batch in enumerate(batches):
        n = SPEC.num_tokens(budget_of(i))
        assert batch.visual_budget == budget_of(i) and batch.tokens_per_image == n
        assert len(batch) * max(row_length(r, n) for r in batch) <= 104
    sizes = {budget: {len(b) for b in batches[:-1] if b.visual_budget == budget} for budget in (1, 16)}
    assert sizes == {1: {9}, 16: {4}}  # 104 // 11 samples at 1 token per image, 104 // 26 at 16
    # A constant budget is a single plan: exactly what `plan` gives (the fixed-count path is unchanged).
    grouped = BatchingConfig(micro_batch_size=4, max_tokens_per_batch=104, group_by_modality_length=True, window=40)
    fixed = plan_window(window, grouped, random.Random(3), lambda i: 4, SPEC.num_tokens)
    assert [list(b) for b in fixed] == plan(window, grouped, random.Random(3), 4)


# ----------------------------------------------------------------------------- (e) invalid budgets


def test_an_invalid_budget_is_refused_with_the_valid_ones(tokenizer):
    with pytest.raises(ValueError, match=r"visual budget 3 .*valid budgets: \[1, 4, 16\]"):
        SPEC.num_tokens(3)
    with pytest.raises(ValueError, match="valid budgets"):
        PoolConnector(32, 64, 16)(torch.zeros(1, 16, 32), budget=9)
    with pytest.raises(ValueError, match="fixed 16"):
        MLPConnector(32, 64, 16)(torch.zeros(1, 16, 32), budget=4)
    with pytest.raises(ValueError, match="compact image spans.*tokens_per_image"):
        collate([compact(0)], pad_token_id=0, image_token_id=9)
    with pytest.raises(ValueError, match="one token count each"):
        VisualTokens(full=16, budgets=(1, 4), tokens=(1,))
    assert SPEC.budget_for(0, 5) == SPEC.budget_for(0, 5, rank=1)  # shared by the ranks unless per_rank
    per_rank = VisualTokens(16, BUDGETS, BUDGETS, per_rank=True)
    assert any(per_rank.budget_for(0, s, 0) != per_rank.budget_for(0, s, 1) for s in range(20))
    assert VisualTokens.fixed(16).budget_for(0, 3) is None


# ----------------------------------------------------------------------------- (c) resume: loader and Trainer


def budget_recipe(demo_data: Path, output_dir: Path, **train) -> dict:
    recipe = tiny_recipe_dict(demo_data, output_dir, micro_batch_size=2, grad_accum=2, log_every=1, **train)
    recipe["model"]["connector"] = {"type": "test_pool"}
    recipe["data"].update(packing=True, max_tokens_per_batch=256, batching_window=16)
    return recipe


@pytest.mark.parametrize("workers", [0, 2])
def test_each_micro_batch_has_its_step_budget_and_resumes_exactly(demo_data, tokenizer, workers):
    data = DataConfig(**{**budget_recipe(demo_data, Path("unused"))["data"], "num_workers": workers})
    model = make_model(tokenizer)
    enc = pipeline.make_encoder(data, tokenizer, model)

    def loader():
        return pipeline.train_loader(data, enc, summary, 2, seed=7, rank=0, world_size=1, grad_accum=2)

    def summary(batch):  # what a micro-batch is: its samples and budget
        return batch.visual_budget, [e.key for row in batch for e in row]

    iterator = iter(loader())
    expected = [next(iterator) for _ in range(20)]
    assert [budget for budget, _ in expected] == [SPEC.budget_for(7, i // 2) for i in range(20)]
    assert len({budget for budget, _ in expected}) > 1
    first = loader()
    iterator = iter(first)
    head = [next(iterator) for _ in range(11)]  # mid-step, and mid-window after a first window on each worker
    state = first.state_dict()
    del iterator, first
    resumed = loader()
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    assert head + [next(iterator) for _ in range(9)] == expected


def logged(output_dir: Path) -> dict[int, tuple[float, int]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: (row["loss"], row["visual_budget"], row["visual_tokens"]) for row in rows if "loss" in row}


def test_resumed_trainer_run_repeats_the_budgets_and_losses(demo_data, tmp_path):
    full = tmp_path / "full"
    Trainer(validate_recipe(budget_recipe(demo_data, full, max_steps=6, save_every=3))).train()
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    Trainer(validate_recipe(budget_recipe(demo_data, resumed, max_steps=6, resume="auto"))).train()
    expected, got = logged(full), logged(resumed)
    assert [expected[s][1] for s in range(1, 7)] == [SPEC.budget_for(0, s - 1) for s in range(1, 7)]
    assert len({expected[s][1] for s in expected}) > 1
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step][1:] == expected[step][1:], step  # the same budget and image tokens
        assert got[step][0] == pytest.approx(expected[step][0], rel=1e-6, abs=1e-7), step
