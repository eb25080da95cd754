"""Generation eval: scoring, greedy decoding (batched = one by one = HF generate), prompts as in
training, `llava-train eval` on a checkpoint and on an exported Llava folder, bad input."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from llava_train.cli import main
from llava_train.data.collate import collate
from llava_train.data.encode import SampleEncoder
from llava_train.data.images import ImageProcessor
from llava_train.data.pipeline import make_encoder
from llava_train.data.templates import get_template
from llava_train.evaluate.answer import EvalOptions, Evaluator
from llava_train.evaluate.checkpoint import NO_LIMIT, evaluate_checkpoint
from llava_train.evaluate.decode import greedy_decode, left_pad
from llava_train.evaluate.questions import QuestionEncoder, read_records
from llava_train.evaluate.scoring import choice_letter, format_table, normalise_answer, options_in, score, summarise
from llava_train.model.build import build_model, load_tokenizer
from llava_train.recipe import validate_recipe
from llava_train.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

# ----------------------------------------------------------------------------- scoring


def test_normalised_exact_match():
    assert normalise_answer("  The Red, circle! ") == "red circle"
    assert score("Red.", "red").correct and score("a square", "square").correct
    assert not score("red circle", "red").correct
    assert score("red", "blue").kind == "exact"


QUESTION = "Which colour is the shape?\nA. red\nB. blue\n(C) green"


@pytest.mark.parametrize(
    "prediction,letter",
    [("B", "B"), ("b", "B"), ("(B)", "B"), ("B. blue", "B"), ("B) blue", "B"), ("The answer is B.", "B"),
     ("Answer: (C)", "C"), ("blue", "B"), ("Green.", "C"), ("A red circle", None), ("purple", None), ("D", None)],
)
def test_choice_letter(prediction, letter):
    assert options_in(QUESTION) == {"A": "red", "B": "blue", "C": "green"}
    assert choice_letter(prediction, options_in(QUESTION)) == letter


def test_multiple_choice_scored_by_letter():
    assert score("B. blue", "B", QUESTION) == score("blue", "(B)", QUESTION)
    assert score("B. blue", "B", QUESTION).kind == "choice" and score("blue", "B", QUESTION).correct
    assert not score("A", "B", QUESTION).correct
    assert score("B", "B", "no options here").kind == "exact"  # a letter answer without options: exact match


def test_summary_breaks_down_by_meta_field():
    rows = [
        {"correct": True, "kind": "exact", "meta": {"qtype": "colour"}},
        {"correct": False, "kind": "exact", "meta": {"qtype": "colour"}},
        {"correct": True, "kind": "choice", "meta": {"qtype": "count"}},
    ]
    summary = summarise(rows, ["qtype"])
    assert (summary["num"], summary["correct"]) == (3, 2)
    assert summary["by"]["qtype"] == {
        "colour": {"num": 2, "correct": 1, "accuracy": 0.5}, "count": {"num": 1, "correct": 1, "accuracy": 1.0}
    }
    assert summary["kinds"]["choice"]["num"] == 1
    table = format_table(summary)
    assert "by qtype" in table and "50.0%" in table and "by kind" in table


# ----------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def tiny(demo_data, tmp_path_factory):
    """A random-init tiny model (random weights give long, varied answers) and eval questions."""
    recipe = validate_recipe(tiny_recipe_dict(demo_data, tmp_path_factory.mktemp("tiny")))
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    torch.manual_seed(0)  # the trainer seeds the same way before building
    model = build_model(recipe.model, tokenizer, None, seed=0).eval()
    encoder = make_encoder(recipe.data.model_copy(update={"max_length": NO_LIMIT}), tokenizer, model)
    questions = QuestionEncoder(encoder, NO_LIMIT)
    examples = [questions(raw).example for raw in read_records(recipe.data.eval, limit=3)]
    examples.append(questions.from_text("Describe nothing at all, in a few words.", []))  # text only
    return model, tokenizer, examples


def _stops_at_different_steps(model, tokenizer, examples) -> list[int]:
    """A stop id that ends row 0 early while other rows go on (read off an unstopped run)."""
    pad = tokenizer.pad_token_id
    free = greedy_decode(model, collate(examples, pad, model.image_token_id), 6, [], pad)
    stop = free[0][2]
    assert any(stop not in row for row in free[1:]), "pick another step: every row would stop"
    return [stop]


def test_batched_greedy_equals_one_by_one(tiny):
    model, tokenizer, examples = tiny
    stops = _stops_at_different_steps(model, tokenizer, examples)
    pad = tokenizer.pad_token_id
    batched = greedy_decode(model, collate(examples, pad, model.image_token_id), 6, stops, pad)
    singles = [greedy_decode(model, collate([e], pad, model.image_token_id), 6, stops, pad)[0] for e in examples]
    assert batched == singles
    assert len(batched[0]) < 6 and max(len(row) for row in batched) == 6  # rows stopped at different steps


def test_greedy_equals_hf_generate(tiny):
    model, tokenizer, examples = tiny
    stops = _stops_at_different_steps(model, tokenizer, examples)
    pad = tokenizer.pad_token_id
    batch = collate(examples, pad, model.image_token_id)
    ours = greedy_decode(model, batch, 6, stops, pad)
    padded = left_pad(batch)
    with torch.no_grad():
        hf = model.lm.generate(
            inputs_embeds=model.embed(padded), attention_mask=padded.attention_mask, max_new_tokens=6,
            do_sample=False, eos_token_id=stops, pad_token_id=pad,
        )
    expected = []
    for row in hf.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        expected.append(row[:cut])
    assert ours == expected


def test_lockstep_keeps_stepping_without_changing_answers(tiny):
    """A rank whose rows are done keeps running forwards while another rank generates (ZeRO-3)."""
    model, tokenizer, examples = tiny
    stops = _stops_at_different_steps(model, tokenizer, examples)
    pad = tokenizer.pad_token_id
    batch = collate(examples[:1], pad, model.image_token_id)  # row 0 stops early
    calls = []
    hook = model.lm.register_forward_hook(lambda *args: calls.append(1))
    try:
        alone = greedy_decode(model, batch, 6, stops, pad)
        alone_calls, calls[:] = len(calls), []
        synced = greedy_decode(model, batch, 6, stops, pad, keep_going=lambda local: True)  # another rank goes on
    finally:
        hook.remove()
    assert synced == alone
    assert alone_calls < 6 and len(calls) == 6  # one forward per new token, as on the slowest rank


def test_evaluator_pads_missing_batches_in_lockstep(tiny, monkeypatch):
    """With fewer batches than another rank, a rank runs dummy batches and drops their answers."""
    import llava_train.evaluate.answer as answer

    model, tokenizer, examples = tiny
    template = get_template("vicuna_v1", tokenizer)
    plain = Evaluator(model, tokenizer, template).answer(examples[:2], EvalOptions(batch_size=2, max_new_tokens=3))
    monkeypatch.setattr(answer, "_max_over_ranks", lambda value, device: max(value, 3))  # a peer has 3 batches
    decoded = []
    synced = Evaluator(model, tokenizer, template, lockstep=True)
    original = synced._decode
    synced._decode = lambda rows, n: decoded.append([e.key for e in rows]) or original(rows, n)
    assert synced.answer(examples[:2], EvalOptions(batch_size=2, max_new_tokens=3)) == plain
    assert decoded[1:] == [["<dummy>"], ["<dummy>"]]


# ----------------------------------------------------------------------------- prompts


def _raw(conversations, key="k"):
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(png, format="PNG")
    record = {"id": key, "conversations": conversations, "images": ["png"], "meta": {"qtype": "colour"}}
    return {"__key__": key, "json": record, "png": png.getvalue()}


def test_prompt_is_the_training_prefix_before_the_last_answer(tiny):
    model, tokenizer, _ = tiny
    recipe_template = get_template("vicuna_v1", tokenizer)
    images = ImageProcessor.from_vision_config(model.vision.config)
    encoder = QuestionEncoder(SampleEncoder(recipe_template, images, model.tokens_per_image, NO_LIMIT), NO_LIMIT)
    single = encoder(_raw([{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]))
    assert single.example.input_ids == recipe_template.prompt_ids("<image>\nWhat colour?", model.tokens_per_image, True)
    assert (single.reference, single.question, single.meta) == ("red", "What colour?", {"qtype": "colour"})

    turns = [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "What shape?"}, {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "Anything else?"},  # after the last answer: no part of the question
    ]
    multi = encoder(_raw(turns))
    full = recipe_template.encode(turns[:4], model.tokens_per_image, NO_LIMIT)
    cut = len(multi.example.input_ids)
    assert full.input_ids[:cut] == multi.example.input_ids and full.labels[cut - 1] == -100
    answer = [t for t, label in zip(full.input_ids[cut:], full.labels[cut:]) if label != -100]
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "circle"
    assert (multi.reference, multi.question) == ("circle", "What shape?")
    assert len(multi.example.images) == 1


# ----------------------------------------------------------------------------- `llava-train eval`


@pytest.fixture(scope="module")
def checkpoint(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    return Trainer(validate_recipe(tiny_recipe_dict(demo_data, out, max_steps=2))).train().checkpoint


def _eval(checkpoint, demo_data, out, *extra):
    return main(["eval", str(checkpoint), "--data", str(demo_data / "eval" / "shard-*.tar"), "--out", str(out),
                 "--max-new-tokens", "3", *extra])


def _predictions(out) -> dict[str, str]:
    rows = map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
    return {row["key"]: row["prediction"] for row in rows}


def test_eval_cli_writes_predictions_summary_and_table(checkpoint, demo_data, tmp_path, capsys):
    assert _eval(checkpoint, demo_data, tmp_path / "b8", "--by", "qtype", "--batch-size", "8") == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "b8" / "summary.json").read_text())
    assert summary["num"] == 32 and summary["template"] == "vicuna_v1" and summary["samples_per_s"] > 0
    assert sum(stats["num"] for stats in summary["by"]["qtype"].values()) == 32
    assert "by qtype" in printed and "32 questions" in printed
    rows = [json.loads(line) for line in (tmp_path / "b8" / "predictions.jsonl").read_text().splitlines()]
    assert {"key", "question", "reference", "prediction", "kind", "correct", "meta"} <= set(rows[0])
    assert all(row["reference"] == row["meta"]["answer"] for row in rows)  # the last assistant turn
    # batched equals one by one
    assert _eval(checkpoint, demo_data, tmp_path / "b1", "--batch-size", "1", "--limit", "12") == 0
    one_by_one = _predictions(tmp_path / "b1")
    assert one_by_one == {k: v for k, v in _predictions(tmp_path / "b8").items() if k in one_by_one}


def test_eval_exported_llava_folder_alike(checkpoint, demo_data, tmp_path):
    from llava_train.model.export import export_checkpoint

    exported = export_checkpoint(checkpoint, tmp_path / "hf")
    options = EvalOptions(batch_size=8, max_new_tokens=3)
    shards = [str(demo_data / "eval" / "shard-*.tar")]
    ours = evaluate_checkpoint(checkpoint, shards, options, tmp_path / "a", limit=8, progress=False)
    theirs = evaluate_checkpoint(
        exported, shards, options, tmp_path / "b", template="vicuna_v1", limit=8, progress=False
    )
    assert _predictions(tmp_path / "a") == _predictions(tmp_path / "b")
    assert ours["accuracy"] == theirs["accuracy"]


@pytest.fixture
def no_model_built(monkeypatch):
    import llava_train.model.io as io_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(io_module, "load_any", refuse)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_is_refused_before_any_model_is_built(checkpoint, demo_data, tmp_path, capsys, no_model_built):
    assert _eval(tmp_path, demo_data, tmp_path / "o") == 2
    assert "is not a checkpoint" in _error(capsys)
    assert _eval(checkpoint, demo_data, tmp_path / "o", "--by", "difficulty") == 2
    message = _error(capsys)
    assert "no meta field 'difficulty'" in message and "qtype" in message  # names the fields there are
    assert _eval(checkpoint, demo_data, tmp_path / "o", "--template", "chatml") == 2
    assert "trained with template 'vicuna_v1'" in _error(capsys)
    assert main(["eval", str(checkpoint), "--data", str(tmp_path / "none-*.tar")]) == 2
    assert "no shard file matches" in _error(capsys)


def test_a_folder_without_a_template_needs_the_flag(checkpoint, demo_data, tmp_path, capsys, no_model_built):
    import shutil

    folder = tmp_path / "bare"
    shutil.copytree(checkpoint / "model", folder)  # model files alone: no recipe.yaml
    meta = json.loads((folder / "llava_train_model.json").read_text())
    meta.pop("template", None)
    (folder / "llava_train_model.json").write_text(json.dumps(meta))
    assert _eval(folder, demo_data, tmp_path / "o") == 2
    assert "pass --template" in _error(capsys)
