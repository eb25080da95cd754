"""Conversation templates, tokenised turn by turn.

A conversation becomes a list of pieces (text, token ids or an image span), each
marked supervised or not. Each run of adjacent text pieces with the same supervision
is tokenised on its own with add_special_tokens=False and the ids are concatenated, so
the supervised tokens are exactly the tokens of the assistant answers (plus their
end-of-turn tokens) and the prompt built for generation is token-for-token the prefix
seen in training. There is no re-tokenise-and-count-offsets step as in LLaVA, which
silently mislabels when a tokenizer merges across a turn boundary. Tokenising a whole
unsupervised run at once (not "USER: ..." and "ASSISTANT:" apart) makes a prompt's ids
equal those of the same text rendered as one string, which is how transformers users
of an exported model prompt it (data/chat_template.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from llava_train.data.batch import IGNORE_INDEX

IMAGE_TOKEN = "<image>"

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int  # image spans kept after truncation


@dataclass(frozen=True)
class Piece:
    """Text to tokenise, ready token ids, or an image span (text=None, ids=None)."""

    text: str | None = None
    ids: tuple[int, ...] | None = None
    supervised: bool = False

    @property
    def is_image(self) -> bool:
        return self.text is None and self.ids is None


IMAGE = Piece()


def ensure_image_token(tokenizer) -> bool:
    """Add `<image>` as a special token when the tokenizer lacks it. True means the vocabulary
    grew, so the caller must resize the LM's embeddings."""
    if IMAGE_TOKEN in tokenizer.get_vocab():
        return False
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return True


def normalise(conversations: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """LLaVA (`from`/`value`) or OpenAI (`role`/`content`) turns -> (system, [(role, text)]).

    Turns before the first user turn are dropped, as LLaVA's preprocessing does."""
    system, turns = None, []
    for i, turn in enumerate(conversations):
        role = turn_role(turn)
        text = turn.get("value", turn.get("content"))
        if role is None or not isinstance(text, str):
            raise ValueError(f"turn {i} needs `from` in {sorted(_ROLES)} and a string `value`, got {turn!r}")
        if role == SYSTEM:
            if i != 0:
                raise ValueError(f"a system turn may only come first, found one at turn {i}")
            system = text
        elif turns or role == USER:
            turns.append((role, text))
    return system, turns


def turn_role(turn: dict) -> str | None:
    """USER, ASSISTANT or SYSTEM for a LLaVA (`from`) or OpenAI (`role`) turn; None if unknown."""
    return _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())


def user_pieces(text: str) -> list[Piece]:
    """Split a user text at `<image>` into text pieces and image spans."""
    parts = text.split(IMAGE_TOKEN)
    pieces = [Piece(text=parts[0])]
    for part in parts[1:]:
        pieces += [IMAGE, Piece(text=part)]
    return [p for p in pieces if p.is_image or p.text]


def strip_images(text: str) -> str:
    # `<image>` outside a user turn would become an image id with no image behind it.
    return text.replace(IMAGE_TOKEN, "")


class ConversationTemplate(ABC):
    """Base: turns -> pieces is template-specific; tokenising, labelling and truncation are shared."""

    name = "base"
    needs_tokens: tuple[str, ...] = ()

    def __init__(self, tokenizer, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        vocab = tokenizer.get_vocab()
        if IMAGE_TOKEN not in vocab:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; call ensure_image_token(tokenizer) first")
        self.image_token_id = vocab[IMAGE_TOKEN]
        for token in self.needs_tokens:
            if token not in vocab:
                raise ValueError(
                    f"template `{self.name}` needs the token {token} in the tokenizer; pick the template that "
                    f"matches your tokenizer (data.template: {', '.join(TEMPLATES)})"
                )

    # ------------------------------------------------------------------ per template

    @abstractmethod
    def conversation_pieces(self, system: str | None, turns: list[tuple[str, str]]) -> list[Piece]:
        """The whole conversation as pieces, each tokenised alone; answers carry labels."""

    @abstractmethod
    def prompt_pieces(self, question: str) -> list[Piece]:
        """One user turn followed by the assistant prefix, ready for generation."""

    @property
    @abstractmethod
    def stop_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn."""

    # ------------------------------------------------------------------ shared

    def encode(self, conversations: list[dict], num_image_tokens: int, max_length: int) -> Encoded | None:
        """Token ids and labels of a whole conversation; None when truncation leaves nothing supervised."""
        system, turns = normalise(conversations)
        pieces = self.conversation_pieces(system, turns)
        ids, labels, spans = self._assemble(pieces, num_image_tokens)
        return truncate(ids, labels, spans, max_length)

    def prompt_ids(self, question: str, num_image_tokens: int, has_image: bool) -> list[int]:
        """One user turn and the assistant prefix, ready for generation."""
        if not has_image:
            question = strip_images(question)
        elif IMAGE_TOKEN not in question:
            question = f"{IMAGE_TOKEN}\n{question}"
        ids, _, _ = self._assemble(self.prompt_pieces(question), num_image_tokens)
        return ids

    def _assemble(self, pieces: list[Piece], num_image_tokens: int):
        pieces = merge_text_runs(pieces)
        texts = [p.text for p in pieces if p.text is not None]
        tokenised = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        ids, labels, spans = [], [], []
        for piece in pieces:
            if piece.is_image:
                spans.append((len(ids), len(ids) + num_image_tokens))
                chunk = [self.image_token_id] * num_image_tokens
            else:
                chunk = list(piece.ids) if piece.ids is not None else next(tokenised)
            ids += chunk
            labels += chunk if piece.supervised else [IGNORE_INDEX] * len(chunk)
        return ids, labels, spans

    def _bos(self) -> list[Piece]:
        bos = self.tokenizer.bos_token_id
        return [Piece(ids=(bos,))] if bos is not None else []

    def _token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    def _eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"template `{self.name}` ends answers with eos, but the tokenizer has no eos_token")
        return eos


def merge_text_runs(pieces: list[Piece]) -> list[Piece]:
    """Join adjacent text pieces of equal supervision, so each run is tokenised as one string."""
    merged: list[Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else Piece(ids=())
        if last.text is not None and piece.text is not None and last.supervised == piece.supervised:
            merged[-1] = Piece(text=last.text + piece.text, supervised=piece.supervised)
        else:
            merged.append(piece)
    return merged


def truncate(ids: list[int], labels: list[int], spans: list[tuple[int, int]], max_length: int) -> Encoded | None:
    """Cut to max_length without splitting an image span: a cut inside a span moves before it."""
    cut = min(len(ids), max_length)
    for start, end in spans:
        if start < cut < end:
            cut = start
    kept = sum(1 for _, end in spans if end <= cut)
    ids, labels = ids[:cut], labels[:cut]
    # labels[0] is never a target (nothing predicts the first token), hence [1:].
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Encoded(ids, labels, kept)


# ----------------------------------------------------------------------------- templates


class PlainTemplate(ConversationTemplate):
    """LLaVA stage-1 captioning: bos, image tokens, caption + eos. The human text is dropped."""

    name = "plain"

    def __init__(self, tokenizer, system_prompt: str | None = None):
        super().__init__(tokenizer, system_prompt)
        self._eos_id()  # fail now, not on every sample

    def conversation_pieces(self, system, turns):
        pieces = self._bos()
        for role, text in turns:
            if role == USER:
                pieces += [IMAGE] * text.count(IMAGE_TOKEN)
            else:
                answer = Piece(text=strip_images(text), supervised=True)
                pieces += [answer, Piece(ids=(self._eos_id(),), supervised=True)]
        return pieces

    def prompt_pieces(self, question):
        return self._bos() + [IMAGE] * question.count(IMAGE_TOKEN)

    @property
    def stop_token_ids(self):
        return [self._eos_id()]


@dataclass(frozen=True)
class Markup:
    """A fixed chat format. `{text}` marks where the message goes."""

    system: str
    user: str
    assistant: str  # prefix before the answer; never supervised
    answer: str  # the answer text (supervised)
    end: str | None  # end-of-turn token after an answer (supervised); None = the tokenizer's eos
    after: str = ""  # separator after the end token (not supervised)
    default_system: str | None = None
    bos: bool = True


MARKUPS = {
    "vicuna_v1": Markup(
        system="{text} ", user="USER: {text} ", assistant="ASSISTANT:", answer=" {text}", end=None,
        default_system=VICUNA_SYSTEM,
    ),
    "llama3": Markup(
        system="<|start_header_id|>system<|end_header_id|>\n\n{text}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", answer="{text}", end="<|eot_id|>",
    ),
    "chatml": Markup(
        system="<|im_start|>system\n{text}<|im_end|>\n", user="<|im_start|>user\n{text}<|im_end|>\n",
        assistant="<|im_start|>assistant\n", answer="{text}", end="<|im_end|>", after="\n",
        default_system="You are a helpful assistant.", bos=False,
    ),
}
_MARKUP_TOKENS = {
    "vicuna_v1": (),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}


class MarkupTemplate(ConversationTemplate):
    def __init__(self, name: str, tokenizer, system_prompt: str | None = None):
        self.name, self.markup = name, MARKUPS[name]
        self.needs_tokens = _MARKUP_TOKENS[name]
        super().__init__(tokenizer, system_prompt)
        if self.markup.end is None:
            self._eos_id()  # fail now, not on every sample

    def _head(self, system: str | None) -> list[Piece]:
        pieces = self._bos() if self.markup.bos else []
        system = system if system is not None else self.system_prompt
        system = system if system is not None else self.markup.default_system
        if system:
            pieces.append(Piece(text=self.markup.system.replace("{text}", strip_images(system))))
        return pieces

    def _user(self, text: str) -> list[Piece]:
        before, after = self.markup.user.split("{text}")
        return user_pieces(before + text + after)

    def _answer(self, text: str) -> list[Piece]:
        end = self._eos_id() if self.markup.end is None else self._token_id(self.markup.end)
        answer = self.markup.answer.replace("{text}", strip_images(text))
        pieces = [Piece(text=answer, supervised=True), Piece(ids=(end,), supervised=True)]
        return pieces + ([Piece(text=self.markup.after)] if self.markup.after else [])

    def conversation_pieces(self, system, turns):
        pieces = self._head(system)
        for role, text in turns:
            if role == USER:
                pieces += self._user(text)
            else:
                pieces += [Piece(text=self.markup.assistant)] + self._answer(text)
        return pieces

    def prompt_pieces(self, question):
        return self._head(None) + self._user(question) + [Piece(text=self.markup.assistant)]

    @property
    def stop_token_ids(self):
        ids = [self._eos_id()] if self.tokenizer.eos_token_id is not None else []
        if self.markup.end is not None:
            ids.insert(0, self._token_id(self.markup.end))
        return list(dict.fromkeys(ids))


class TokenizerTemplate(ConversationTemplate):
    """The tokenizer's own jinja chat_template, rendered on growing prefixes of the conversation.

    Each new prefix must extend the previous string; the difference is one turn, which is
    tokenised alone. In an assistant turn everything after the generation prompt up to and
    including the end-of-turn special tokens is supervised; trailing separators are not.
    """

    name = "tokenizer"

    def __init__(self, tokenizer, system_prompt: str | None = None):
        super().__init__(tokenizer, system_prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template `tokenizer` needs a tokenizer with a chat_template; "
                f"set one or pick a fixed template ({', '.join(t for t in TEMPLATES if t != 'tokenizer')})"
            )
        self._special_ids = set(tokenizer.all_special_ids)
        self._stop = self._find_stop_ids()

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # jinja raises its own types, e.g. "roles must alternate"
            raise ValueError(f"the tokenizer's chat_template failed on this conversation: {err}") from None

    def _messages(self, system: str | None, turns) -> list[dict]:
        system = system if system is not None else self.system_prompt
        head = [{"role": SYSTEM, "content": system}] if system is not None else []
        return head + [{"role": role, "content": text} for role, text in turns]

    def conversation_pieces(self, system, turns):
        messages = self._messages(system, turns)
        offset = len(messages) - len(turns)
        pieces, rendered = [], ""
        for i, (role, text) in enumerate(turns):
            ends_with_prompt = role == USER and i + 1 < len(turns) and turns[i + 1][0] == ASSISTANT
            upto = self._render(messages[: offset + i + 1], generation_prompt=ends_with_prompt)
            if not upto.startswith(rendered):
                raise ValueError(
                    "the tokenizer's chat_template rewrites earlier turns (its rendering of a longer conversation "
                    "does not extend the shorter one); use a fixed template such as chatml or llama3"
                )
            turn, rendered = upto[len(rendered) :], upto
            pieces += user_pieces(turn) if role == USER else self._assistant_pieces(turn, text)
        return pieces

    def _assistant_pieces(self, turn: str, answer: str) -> list[Piece]:
        answer = strip_images(answer)
        at = 0 if turn.startswith(answer) else turn.find(answer)
        if at < 0 and answer.strip():
            answer = answer.strip()  # many templates trim the content
            at = turn.find(answer)
        if at < 0:
            raise ValueError(f"the chat_template did not render the assistant text {answer!r} verbatim")
        head, tail = turn[:at], turn[at + len(answer) :]
        tail_ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
        last_special = max((j for j, t in enumerate(tail_ids) if t in self._special_ids), default=len(tail_ids) - 1)
        # `head` (e.g. a space after "Assistant:") follows the generation prompt, so the model
        # must produce it too: it is supervised, tokenised together with the answer.
        return [
            Piece(text=head + answer, supervised=True),
            Piece(ids=tuple(tail_ids[: last_special + 1]), supervised=True),
            Piece(ids=tuple(tail_ids[last_special + 1 :])),
        ]

    def prompt_pieces(self, question):
        text = self._render(self._messages(None, [(USER, question)]), generation_prompt=True)
        return user_pieces(text)

    def _find_stop_ids(self) -> list[int]:
        """End-of-turn ids: the special tokens a rendered assistant turn ends with, then eos."""
        probe = "xyzzy"
        ids = []
        try:
            pieces = self.conversation_pieces(None, [(USER, "hi"), (ASSISTANT, probe)])
            ids = [t for p in pieces if p.ids and p.supervised for t in p.ids if t in self._special_ids]
        except Exception:  # an exotic template: fall back to eos alone
            pass
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return list(dict.fromkeys(ids))

    @property
    def stop_token_ids(self):
        return list(self._stop)


TEMPLATES = ("plain", "vicuna_v1", "llama3", "chatml", "tokenizer")


def get_template(name: str, tokenizer, system_prompt: str | None = None) -> ConversationTemplate:
    if name == "plain":
        return PlainTemplate(tokenizer, system_prompt)
    if name == "tokenizer":
        return TokenizerTemplate(tokenizer, system_prompt)
    if name in MARKUPS:
        return MarkupTemplate(name, tokenizer, system_prompt)
    raise ValueError(f"unknown conversation template {name!r}; valid names: {', '.join(TEMPLATES)}")
