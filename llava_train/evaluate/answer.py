"""Answer prompts in batches and score them: the part `llava-train eval`, the in-loop evaluation
and the lmms-eval adapter share.

Prompts are sorted by length (less padding), cut into batches of `batch_size` and decoded
greedily (decode.py); answers come back in the input order. With `lockstep` (training under
ZeRO-3, every rank answering its own share) the ranks first agree on the largest number of
batches any of them has; a rank with fewer runs dummy one-token batches, whose answers are
dropped, so every rank runs the same forwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llava_train.data.batch import IGNORE_INDEX, Example
from llava_train.data.collate import collate
from llava_train.data.templates import ConversationTemplate
from llava_train.evaluate.decode import greedy_decode
from llava_train.evaluate.questions import Question
from llava_train.evaluate.scoring import score
from llava_train.model.mllm import MultimodalLM


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = 16
    max_new_tokens: int = 32
    by: tuple[str, ...] = ()  # meta fields to break accuracy down by


class Evaluator:
    def __init__(
        self,
        model: MultimodalLM,
        tokenizer,
        template: ConversationTemplate,
        device: torch.device | str = "cpu",
        autocast: bool = False,
        lockstep: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.device = torch.device(device)
        self.autocast = autocast  # bf16 matmuls on a CPU, as the trainer runs them
        self.lockstep = lockstep
        self.pad_id = tokenizer.pad_token_id

    def answer(self, examples: list[Example], options: EvalOptions, progress=None) -> list[str]:
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
        batches = [order[i : i + options.batch_size] for i in range(0, len(order), options.batch_size)]
        count = _max_over_ranks(len(batches), self.device) if self.lockstep else len(batches)
        answers: list[str] = [""] * len(examples)
        for b in range(count):
            rows = batches[b] if b < len(batches) else []
            tokens = self._decode([examples[i] for i in rows] or [self._dummy()], options.max_new_tokens)
            for i, ids in zip(rows, tokens):
                answers[i] = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            if progress is not None:
                progress.update(len(rows))
        return answers

    def score(self, questions: list[Question], options: EvalOptions, progress=None) -> list[dict]:
        """One prediction row per question: key, question, reference, prediction, kind, correct, meta."""
        answers = self.answer([q.example for q in questions], options, progress)
        rows = []
        for q, prediction in zip(questions, answers):
            result = score(prediction, q.reference, q.question)
            rows.append({
                "key": q.key, "question": q.question, "reference": q.reference, "prediction": prediction,
                "kind": result.kind, "correct": result.correct, "meta": q.meta,
            })
        return rows

    def _decode(self, examples: list[Example], max_new_tokens: int) -> list[list[int]]:
        batch = collate(examples, self.pad_id, self.model.image_token_id).to(self.device)
        keep_going = self._any_rank if self.lockstep else (lambda local: local)
        with torch.autocast(self.device.type, torch.bfloat16) if self.autocast else contextlib.nullcontext():
            return greedy_decode(
                self.model, batch, max_new_tokens, self.template.stop_token_ids, self.pad_id, keep_going
            )

    def _dummy(self) -> Example:
        """A one-token text prompt for a rank with no batch left (its answer is dropped)."""
        return Example([self.pad_id], [IGNORE_INDEX], key="<dummy>")

    def _any_rank(self, local: bool) -> bool:
        return _max_over_ranks(int(local), self.device) > 0


def _max_over_ranks(value: int, device: torch.device) -> int:
    """The largest `value` over ranks (a collective); `value` itself in one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    on_gpu = dist.get_backend() == "nccl"
    tensor = torch.tensor([value], dtype=torch.long, device=device if on_gpu else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
