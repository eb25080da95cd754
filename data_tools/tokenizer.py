"""Train a small byte-level BPE tokenizer locally, so nothing comes from a hub.

Byte-level means every string is encodable (no unknown characters) and decoding is
lossless, which the template tests rely on. The chat markers of every built-in
template are special tokens, so any template works with the result.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE, *CHAT_MARKERS]

# ChatML, so `data.template: tokenizer` also works with this tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `texts`, saved to `out_dir` (loadable with AutoTokenizer.from_pretrained)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..9, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IMAGE, *CHAT_MARKERS],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def pad_vocabulary(out_dir: str | Path, size: int) -> None:
    """Grow a tokenizer saved by `train_tokenizer` to `size` ids with unused tokens (`<|unused_N|>`), so a
    model with a real vocabulary size (Qwen2's 151936) has exactly one embedding row per id. No merge
    makes the new tokens, so text encodes exactly as before."""
    path = Path(out_dir) / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    if len(vocab) > size:
        raise ValueError(f"{path} already has {len(vocab)} ids, more than the {size} asked for; ask for at least that")
    next_id = max(vocab.values()) + 1
    for index in range(size - next_id):
        vocab[f"<|unused_{index}|>"] = next_id + index
    path.write_text(json.dumps(spec, ensure_ascii=False))
