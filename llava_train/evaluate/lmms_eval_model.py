"""The `llava_train` model for lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval):

    lmms-eval --model llava_train --model_args pretrained=CKPT[,batch_size=8,template=vicuna_v1] --tasks TASK

lmms-eval finds it through the entry-point group `lmms_eval.models` (pyproject.toml), whose value,
`manifest`, names the class; installing llava_train with the `[eval]` extra is all it takes. CKPT
is a llava_train checkpoint or an exported transformers Llava folder. Prompts follow the template
the checkpoint trained with, images its preprocessing (checkpoint.py, questions.py); answers are
greedy (answer.py), cut at the task's `until` strings. `loglikelihood` (multiple-choice tasks)
scores a continuation after the same prompt. One process; a task's sampling settings are ignored.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from llava_train.data.batch import Example
from llava_train.data.collate import collate


def manifest() -> ModelManifest:
    """The entry point's payload: lmms-eval imports the class only when `--model llava_train` asks."""
    return ModelManifest(model_id="llava_train", simple_class_path=f"{__name__}.LlavaTrain")


class LlavaTrain(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        max_new_tokens: int | str = 64,
        template: str | None = None,
        device: str | None = None,
        **unused,
    ):
        super().__init__()
        from llava_train.data.pipeline import make_encoder
        from llava_train.evaluate.answer import EvalOptions, Evaluator
        from llava_train.evaluate.checkpoint import NO_LIMIT, check_model_folder, resolve_prompting
        from llava_train.evaluate.questions import QuestionEncoder
        from llava_train.model.io import load_any
        from llava_train.recipe import DataConfig

        check_model_folder(pretrained)  # bad input fails before the model is built
        prompting = resolve_prompting(pretrained, template)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer = load_any(pretrained)
        self.model.to(self.device)
        data = DataConfig(train=["<lmms-eval>"], template=prompting.template, **prompting.data)
        encoder = make_encoder(data.model_copy(update={"max_length": NO_LIMIT}), self.tokenizer, self.model)
        self.encoder = QuestionEncoder(encoder, NO_LIMIT)
        self.evaluator = Evaluator(self.model, self.tokenizer, self.encoder.encoder.template, self.device)
        self.options = EvalOptions(batch_size=int(batch_size), max_new_tokens=int(max_new_tokens))

    # ------------------------------------------------------------------ requests

    def _prompt(self, context: str, doc_to_visual, doc_id, task, split) -> Example:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if any(not hasattr(v, "convert") for v in visuals):
            raise ValueError(f"task {task}: llava_train answers about images only, got {type(visuals[0]).__name__}")
        return self.encoder.from_text(context, visuals, key=f"{task}/{doc_id}")

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, batched per max_new_tokens, each cut at its task's `until` strings."""
        groups: dict[int, list[int]] = defaultdict(list)
        prompts, untils = [], []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            prompts.append(self._prompt(context, doc_to_visual, doc_id, task, split))
            until = gen_kwargs.get("until") or []
            untils.append([until] if isinstance(until, str) else list(until))
            groups[int(gen_kwargs.get("max_new_tokens", self.options.max_new_tokens))].append(i)
        answers = [""] * len(requests)
        for max_new_tokens, members in groups.items():
            options = dataclasses.replace(self.options, max_new_tokens=max_new_tokens)
            for i, text in zip(members, self.evaluator.answer([prompts[i] for i in members], options)):
                answers[i] = _cut(text, untils[i])
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """log p(continuation | prompt) and whether greedy decoding would produce the continuation."""
        results = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            prompt = self._prompt(context, doc_to_visual, doc_id, task, split)
            ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            results.append(self._continuation_logprob(prompt, ids))
        return results

    def _continuation_logprob(self, prompt: Example, ids: list[int]) -> tuple[float, bool]:
        whole = Example(prompt.input_ids + ids, prompt.labels + ids, prompt.images)
        batch = collate([whole], self.tokenizer.pad_token_id, self.model.image_token_id).to(self.device)
        logits = self.model.lm(inputs_embeds=self.model.embed(batch), attention_mask=batch.attention_mask).logits
        scores = logits[0, len(prompt.input_ids) - 1 : -1].float().log_softmax(-1)  # positions predicting `ids`
        target = torch.tensor(ids, device=scores.device)
        logprob = scores.gather(-1, target[:, None]).sum()
        return float(logprob), bool((scores.argmax(-1) == target).all())

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("llava_train answers single-round tasks; pick a task without multi-round generation")


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text.strip()
