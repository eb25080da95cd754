"""Conversation templates: supervised tokens are exactly the answers, image spans stay whole."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data_tools.tokenizer import train_tokenizer
from llava_train.data.batch import IGNORE_INDEX
from llava_train.data.templates import IMAGE_TOKEN, TEMPLATES, ensure_image_token, get_template

N_IMG = 5  # image tokens per image

# A non-ChatML jinja template: bos rendered by the template, content trimmed, text around the answer.
CUSTOM_JINJA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}### User: {{ m['content'] }}\n"
    "{% else %}### Assistant: {{ m['content'] | trim }}</s>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:{% endif %}"
)

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "two circles"},
]
ANSWERS = ["red", "two circles"]
# What each template supervises per answer: (text before the answer, end-of-turn text).
SUPERVISED = {
    "plain": ("", "</s>"),
    "vicuna_v1": (" ", "</s>"),
    "llama3": ("", "<|eot_id|>"),
    "chatml": ("", "<|im_end|>"),
    "tokenizer": ("", "<|im_end|>"),
    "custom": (" ", "</s>"),  # the space after "### Assistant:" is generated, so supervised
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [turn["value"] for turn in CONVERSATION] * 20 + ["USER: ASSISTANT: system user assistant"] * 20
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok"), vocab_size=400)


def template_for(name, tokenizer, **kwargs):
    if name == "custom":
        custom = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **tokenizer.special_tokens_map)
        custom.chat_template = CUSTOM_JINJA
        return get_template("tokenizer", custom, **kwargs)
    return get_template(name, tokenizer, **kwargs)


def runs(ids, labels):
    """Maximal stretches of supervised tokens."""
    out, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                out.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return out + ([current] if current else [])


@pytest.mark.parametrize("name", [*TEMPLATES, "custom"])
def test_supervised_tokens_are_exactly_the_answers(name, tokenizer):
    template = template_for(name, tokenizer)
    encoded = template.encode(CONVERSATION, num_image_tokens=N_IMG, max_length=1000)
    lead, end = SUPERVISED[name]
    expected = [lead + answer + end for answer in ANSWERS]
    got = [tokenizer.decode(run) for run in runs(encoded.input_ids, encoded.labels)]
    if name == "plain":  # nothing separates the answers in the plain template
        got, expected = ["".join(got)], ["".join(expected)]
    assert got == expected
    assert encoded.num_images == 1
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert encoded.input_ids.count(image_id) == N_IMG
    assert tokenizer.convert_tokens_to_ids(end) in template.stop_token_ids
    if name in ("plain", "vicuna_v1", "llama3", "custom"):
        assert encoded.input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("name", [*TEMPLATES, "custom"])
def test_generation_prompt_is_the_training_prefix(name, tokenizer):
    template = template_for(name, tokenizer)
    question = "What colour is the shape?"
    conversation = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": "red"}]
    train_ids = template.encode(conversation, N_IMG, 1000).input_ids
    prompt = template.prompt_ids(question, N_IMG, has_image=True)
    assert train_ids[: len(prompt)] == prompt
    first_label = next(i for i, label in enumerate(template.encode(conversation, N_IMG, 1000).labels) if label != -100)
    assert first_label == len(prompt)  # the answer starts right where generation starts


def test_system_prompt_and_roles(tokenizer):
    template = get_template("chatml", tokenizer, system_prompt="Be brief.")
    ids = template.encode(CONVERSATION, N_IMG, 1000).input_ids
    assert "Be brief." in tokenizer.decode(ids)
    openai_style = [{"role": "system", "content": "Be terse."}] + [
        {"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in CONVERSATION
    ]
    text = tokenizer.decode(template.encode(openai_style, N_IMG, 1000).input_ids)
    assert "Be terse." in text and "Be brief." not in text  # the conversation's own system turn wins


TWO_IMAGES = [
    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "And here? <image>\nWhat colour?"},
    {"from": "gpt", "value": "blue"},
]


@pytest.mark.parametrize("name", [*TEMPLATES, "custom"])
def test_truncation_never_cuts_an_image_span(name, tokenizer):
    template = template_for(name, tokenizer)
    full = template.encode(TWO_IMAGES, N_IMG, 1000)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    starts = [i for i, t in enumerate(full.input_ids) if t == image_id and full.input_ids[i - 1] != image_id]
    assert full.num_images == 2 and len(starts) == 2
    start, end = starts[1], starts[1] + N_IMG
    for max_length in range(start - 1, end + 2):
        cut = template.encode(TWO_IMAGES, N_IMG, max_length)
        assert cut is not None  # the first answer survives
        assert len(cut.input_ids) <= max_length
        kept = cut.input_ids.count(image_id)
        assert kept == cut.num_images * N_IMG
        assert cut.num_images == (2 if max_length >= end else 1)
        if start < max_length < end:
            assert len(cut.input_ids) == start  # cut moved before the span
        assert cut.input_ids == full.input_ids[: len(cut.input_ids)]


@pytest.mark.parametrize("name", [*TEMPLATES, "custom"])
def test_nothing_supervised_left_gives_none(name, tokenizer):
    template = template_for(name, tokenizer)
    full = template.encode(CONVERSATION, N_IMG, 1000)
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert template.encode(CONVERSATION, N_IMG, first_label) is None
    assert template.encode(CONVERSATION, N_IMG, first_label + 1) is not None
    unanswered = CONVERSATION[:1]
    assert template.encode(unanswered, N_IMG, 1000) is None


def test_image_literal_outside_user_turns_is_not_an_image(tokenizer):
    template = get_template("vicuna_v1", tokenizer)
    conversation = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "an <image> here"}]
    ids = template.encode(conversation, N_IMG, 1000).input_ids
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) not in ids


def test_unknown_names_and_missing_markers_are_explained(tokenizer):
    with pytest.raises(ValueError, match="valid names: plain, vicuna_v1, llama3, chatml, tokenizer"):
        get_template("alpaca", tokenizer)
    bare = PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(["<unk>", "</s>", "hi"]), unk_token="<unk>", eos_token="</s>"
    )
    assert ensure_image_token(bare) is True
    assert ensure_image_token(bare) is False
    assert bare("hi <image>", add_special_tokens=False)["input_ids"][-1] == bare.convert_tokens_to_ids(IMAGE_TOKEN)
    with pytest.raises(ValueError, match=r"<\|im_start\|>"):
        get_template("chatml", bare)
    with pytest.raises(ValueError, match="chat_template"):
        get_template("tokenizer", bare)
    with pytest.raises(ValueError, match="turn 0"):
        get_template("vicuna_v1", tokenizer).encode([{"from": "robot", "value": "x"}], N_IMG, 100)


def _word_tokenizer(words: list[str]) -> Tokenizer:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return core
