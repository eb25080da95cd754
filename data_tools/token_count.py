"""Token lengths of shard records, laid out by a conversation template as training would.

Image tokens are not counted (a placeholder contributes nothing): their number depends on
the vision tower, so add images x tokens-per-image (576 for CLIP ViT-L/14 at 336 px).
"""

from __future__ import annotations

import sys
from pathlib import Path

from llava_train.data.errors import BadSample

DEFAULT_TEMPLATE = "vicuna_v1"


class TokenCounter:
    def __init__(self, tokenizer_dir: str | Path, template: str = DEFAULT_TEMPLATE):
        from transformers import AutoTokenizer

        from llava_train.data.templates import ensure_image_token, get_template

        if not Path(tokenizer_dir, "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"--tokenizer {str(tokenizer_dir)!r} is not a tokenizer folder (no tokenizer_config.json); "
                "pass the folder of a Hugging Face tokenizer"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        ensure_image_token(tokenizer)
        self.template = get_template(template, tokenizer)

    def lengths(self, record: dict) -> list[int]:
        """One length per training sequence: a conversation has one, a preference pair two
        (prompt + chosen, prompt + rejected)."""
        if "conversations" in record:
            return [self._length(record["conversations"])]
        prompt = {"from": "human", "value": record["prompt"]}
        return [self._length([prompt, {"from": "gpt", "value": record[side]}]) for side in ("chosen", "rejected")]

    def _length(self, conversations: list) -> int:
        try:
            encoded = self.template.encode(conversations, num_image_tokens=0, max_length=sys.maxsize)
        except ValueError as err:  # e.g. a chat_template that rejects this turn order
            raise BadSample("bad conversation", str(err)) from None
        return len(encoded.input_ids) if encoded is not None else 0
