"""A training template as a Jinja chat template, for transformers users of an exported model.

The Jinja is derived from the template object (its markup, bos, default system prompt,
end-of-turn token, or the tokenizer's own template), so `processor.apply_chat_template`
renders the string whose tokens are the ids `ConversationTemplate.encode`/`prompt_ids`
give in training (tests/test_chat_template.py checks this per template). A message's
content is a string (with `<image>` where an image goes) or transformers' list of parts,
`[{"type": "image"}, {"type": "text", "text": ...}]`, whose parts are joined with "\\n":
an image then a question becomes LLaVA's `<image>\\n{question}`, as in training and in
`llava-train generate`.
"""

from __future__ import annotations

import json

from llava_train.data.templates import (
    IMAGE_TOKEN,
    ConversationTemplate,
    MarkupTemplate,
    PlainTemplate,
    TokenizerTemplate,
)

# Message content -> text. transformers' image parts may carry the image under any key.
_AS_TEXT = (
    "{%- macro as_text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    '{%- if not loop.first -%}{{- "\\n" -}}{%- endif -%}'
    '{%- if part.type == "image" -%}{{- IMAGE -}}'
    '{%- elif part.type == "text" -%}{{- part.text -}}'
    '{%- else -%}{{- raise_exception("llava_train templates take text and image parts, not " + part.type) -}}'
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}\n"
)

# `ns.system` (the conversation's system message, else the default) and `ns.turns` (string
# contents, from the first user turn on: `normalise` drops earlier turns in training too).
_TURNS = (
    "{%- set ns = namespace(system=DEFAULT_SYSTEM, turns=[]) -%}"
    "{%- for m in messages -%}"
    '{%- if m.role == "system" -%}'
    '{%- if not loop.first -%}{{- raise_exception("a system message may only come first") -}}{%- endif -%}'
    "{%- set ns.system = as_text(m.content) -%}"
    '{%- elif m.role == "user" or (m.role == "assistant" and ns.turns) -%}'
    '{%- set ns.turns = ns.turns + [{"role": m.role, "content": as_text(m.content)}] -%}'
    '{%- elif m.role != "assistant" -%}'
    '{{- raise_exception("roles are system, user and assistant, not " + m.role) -}}'
    "{%- endif -%}{%- endfor -%}\n"
)


def jinja_chat_template(template: ConversationTemplate) -> str:
    """The Jinja chat template that renders `template`'s training layout."""
    if isinstance(template, PlainTemplate):
        body = _plain(template)
    elif isinstance(template, MarkupTemplate):
        body = _markup(template)
    elif isinstance(template, TokenizerTemplate):
        body = _tokenizer(template)
    else:
        raise TypeError(f"no Jinja rendering for template `{template.name}` ({type(template).__name__})")
    header = f"{{#- llava_train `{template.name}` template, derived from llava_train/data/templates.py -#}}\n"
    constants = _set("IMAGE", IMAGE_TOKEN) + _set("DEFAULT_SYSTEM", _default_system(template))
    return header + constants + _AS_TEXT + _TURNS + body


def renders_training_ids(template: ConversationTemplate, jinja: str, num_image_tokens: int) -> bool:
    """Whether prompts rendered with `jinja` and tokenised whole, as LlavaProcessor does, get the
    training ids. They do when the template's pieces meet at token boundaries of this tokenizer
    (the built-in templates with byte-level BPE tokenizers, tested); a tokenizer that prefixes a
    space to every text it is given (SentencePiece) may not."""
    question, answer = "What is in the image?", "A cat on a mat."
    ask = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    reply = {"role": "assistant", "content": answer}
    conversation = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]
    probes = [
        ([ask], True, template.prompt_ids(question, num_image_tokens, has_image=True)),
        ([ask, reply], False, template.encode(conversation, num_image_tokens, max_length=10**6).input_ids),
    ]
    tokenizer = template.tokenizer
    for messages, generation_prompt, expected in probes:
        text = tokenizer.apply_chat_template(
            messages, chat_template=jinja, tokenize=False, add_generation_prompt=generation_prompt
        )
        text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens)
        # LlavaProcessor adds the tokenizer's special tokens unless the prompt starts with bos.
        add_special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
        if tokenizer(text, add_special_tokens=add_special)["input_ids"] != expected:
            return False
    return True


def _plain(template: PlainTemplate) -> str:
    # bos, one image placeholder per image of the user turns (their text is dropped), caption + eos.
    return (
        _literal(template.tokenizer.bos_token if template.tokenizer.bos_token_id is not None else "")
        + "{%- for m in ns.turns -%}"
        + '{%- if m.role == "user" -%}{{- IMAGE * m.content.count(IMAGE) -}}'
        + "{%- else -%}{{- m.content | replace(IMAGE, '') -}}"
        + _literal(template.tokenizer.eos_token)
        + "{%- endif -%}{%- endfor -%}"
    )


def _markup(template: MarkupTemplate) -> str:
    markup, tokenizer = template.markup, template.tokenizer
    end = markup.end if markup.end is not None else tokenizer.eos_token
    system_before, system_after = markup.system.split("{text}")
    user_before, user_after = markup.user.split("{text}")
    answer_before, answer_after = markup.answer.split("{text}")
    bos = tokenizer.bos_token if markup.bos and tokenizer.bos_token_id is not None else ""
    return (
        _literal(bos)
        + "{%- if ns.system -%}"
        + _literal(system_before)
        + "{{- ns.system | replace(IMAGE, '') -}}"
        + _literal(system_after)
        + "{%- endif -%}{%- for m in ns.turns -%}"
        + '{%- if m.role == "user" -%}'
        + _literal(user_before)
        + "{{- m.content -}}"
        + _literal(user_after)
        + "{%- else -%}"
        + _literal(markup.assistant + answer_before)
        + "{{- m.content | replace(IMAGE, '') -}}"
        + _literal(answer_after + end + markup.after)
        + "{%- endif -%}{%- endfor -%}"
        + "{%- if add_generation_prompt -%}"
        + _literal(markup.assistant)
        + "{%- endif -%}"
    )


def _tokenizer(template: TokenizerTemplate) -> str:
    # The tokenizer's own template, handed string contents and the recipe's system prompt.
    rebuilt = (
        '{%- set messages = ([{"role": "system", "content": ns.system}] if ns.system is not none else [])'
        " + ns.turns -%}\n"
    )
    return rebuilt + template.tokenizer.chat_template


def _default_system(template: ConversationTemplate) -> str | None:
    if template.system_prompt is not None:
        return template.system_prompt
    if isinstance(template, MarkupTemplate):
        return template.markup.default_system
    return None


def _set(name: str, value: str | None) -> str:
    return f"{{%- set {name} = {_jinja_string(value)} -%}}\n"


def _literal(text: str) -> str:
    return f"{{{{- {_jinja_string(text)} -}}}}" if text else ""


def _jinja_string(value: str | None) -> str:
    # A JSON string is a valid Jinja string literal (Jinja decodes its backslash escapes).
    return "none" if value is None else json.dumps(value, ensure_ascii=False)
