"""Exported Jinja chat templates render the training layout: their tokens are the training ids."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from data_tools.tokenizer import train_tokenizer
from llava_train.data.chat_template import jinja_chat_template
from llava_train.data.templates import IMAGE_TOKEN, TEMPLATES, get_template

N_IMG = 4  # image tokens per image

# A non-ChatML tokenizer template: bos rendered by the template, content trimmed, text around the answer.
CUSTOM_JINJA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}### User: {{ m['content'] }}\n"
    "{% else %}### Assistant: {{ m['content'] | trim }}</s>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:{% endif %}"
)


def turn(role: str, text: str) -> dict:
    return {"from": {"user": "human", "assistant": "gpt", "system": "system"}[role], "value": text}


CONVERSATIONS = {
    "one image": [turn("user", "<image>\nWhat colour is the shape?"), turn("assistant", "red")],
    "multi-turn, second turn without image": [
        turn("user", "<image>\nWhat colour is the shape?"),
        turn("assistant", "red"),
        turn("user", "How many shapes are there?"),
        turn("assistant", "two circles"),
    ],
    "text only": [turn("user", "Say hello."), turn("assistant", "hello there")],
    "own system prompt": [
        turn("system", "Answer in one word."),
        turn("user", "<image>\nWhat shape is it?"),
        turn("assistant", "circle"),
    ],
    "image in the second turn": [
        turn("user", "Hi."),
        turn("assistant", "Hello."),
        turn("user", "And here? <image>\nWhat colour?"),
        turn("assistant", "blue"),
    ],
    "answer before the first question (dropped)": [
        turn("assistant", "ignored"),
        turn("user", "<image>\nHow many?"),
        turn("assistant", "three"),
    ],
}

CASES = [(name, None) for name in TEMPLATES] + [
    ("custom", None),
    ("vicuna_v1", "Be brief."),
    ("chatml", "Be brief."),
    ("tokenizer", "Be brief."),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [t["value"] for conv in CONVERSATIONS.values() for t in conv] * 20
    texts += ["USER: ASSISTANT: system user assistant ### User: ### Assistant:"] * 20
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)


def template_for(name, tokenizer, system_prompt=None):
    if name == "custom":
        custom = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **tokenizer.special_tokens_map)
        custom.chat_template = CUSTOM_JINJA
        return get_template("tokenizer", custom, system_prompt)
    return get_template(name, tokenizer, system_prompt)


def messages(conversation: list[dict], parts: bool = False) -> list[dict]:
    """LLaVA turns -> transformers messages; with `parts`, a leading `<image>\\n` becomes an image part."""
    out = []
    for t in conversation:
        role = {"human": "user", "gpt": "assistant", "system": "system"}[t["from"]]
        text = t["value"]
        if parts and role == "user" and text.startswith(f"{IMAGE_TOKEN}\n"):
            question = text[len(IMAGE_TOKEN) + 1 :]
            out.append({"role": role, "content": [{"type": "image"}, {"type": "text", "text": question}]})
        elif parts:
            out.append({"role": role, "content": [{"type": "text", "text": text}]})
        else:
            out.append({"role": role, "content": text})
    return out


def rendered_ids(template, msgs, generation_prompt: bool) -> list[int]:
    """What LlavaProcessor does: render, expand each `<image>` to its tokens, tokenise the whole string."""
    tokenizer = template.tokenizer
    text = tokenizer.apply_chat_template(
        msgs, chat_template=jinja_chat_template(template), tokenize=False, add_generation_prompt=generation_prompt
    )
    return tokenizer(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * N_IMG), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("parts", [False, True], ids=["string content", "list of parts"])
@pytest.mark.parametrize("name,system_prompt", CASES)
def test_rendered_conversations_tokenise_to_the_training_ids(name, system_prompt, parts, tokenizer):
    template = template_for(name, tokenizer, system_prompt)
    for label, conversation in CONVERSATIONS.items():
        expected = template.encode(conversation, N_IMG, max_length=10**6).input_ids
        got = rendered_ids(template, messages(conversation, parts), generation_prompt=False)
        assert got == expected, f"{label}:\n{tokenizer.decode(got)!r}\n{tokenizer.decode(expected)!r}"


@pytest.mark.parametrize("name,system_prompt", CASES)
def test_generation_prompts_are_the_generate_prompts(name, system_prompt, tokenizer):
    template = template_for(name, tokenizer, system_prompt)
    question = "What colour is the shape?"
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert rendered_ids(template, with_image, True) == template.prompt_ids(question, N_IMG, has_image=True)
    text_only = [{"role": "user", "content": question}]
    assert rendered_ids(template, text_only, True) == template.prompt_ids(question, N_IMG, has_image=False)


def test_unknown_parts_and_roles_are_refused(tokenizer):
    jinja = jinja_chat_template(get_template("chatml", tokenizer))
    with pytest.raises(Exception, match="text and image parts, not video"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], chat_template=jinja)
    with pytest.raises(Exception, match="roles are system, user and assistant, not tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=jinja)


def test_export_check_notices_prompts_that_tokenise_otherwise(tokenizer, monkeypatch):
    """`renders_training_ids` (export warns when False) catches a layout whose pieces meet inside a token:
    vicuna's markers tokenised apart, as training did before prompt text was tokenised in runs."""
    from llava_train.data import templates
    from llava_train.data.chat_template import renders_training_ids

    template = get_template("vicuna_v1", tokenizer)
    assert renders_training_ids(template, jinja_chat_template(template), N_IMG)
    monkeypatch.setattr(templates, "merge_text_runs", lambda pieces: pieces)
    assert not renders_training_ids(template, jinja_chat_template(template), N_IMG)
