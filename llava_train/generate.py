"""Answer questions about images with a trained checkpoint (greedy or sampled, KV-cached).

Decoding is delegated to the LM's own `generate` over `inputs_embeds`, which keeps a
KV cache; the multimodal part only builds the prompt embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image

from llava_train.data.batch import IGNORE_INDEX, Batch, Example
from llava_train.data.collate import collate
from llava_train.data.images import ImageProcessor
from llava_train.data.templates import get_template
from llava_train.model import context
from llava_train.model.io import load_model_files
from llava_train.model.mllm import MultimodalLM
from llava_train.model.prompting import checkpoint_prompting


@dataclass
class DecodeOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


class Answerer:
    def __init__(
        self,
        model: MultimodalLM,
        tokenizer,
        template: str = "vicuna_v1",
        image_mode: str = "pad",
        system_prompt: str | None = None,
        images: ImageProcessor | None = None,
        visual_budget: int | None = None,
    ):
        self.model = model.eval()
        self.visual_budget = visual_budget  # a Matryoshka connector's tokens per image; None: its full count
        self.tokens_per_image = model.connector.visual_tokens().num_tokens(visual_budget)  # refuses a bad budget
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer, system_prompt)
        self.images = images or ImageProcessor.from_vision_config(model.vision.config, mode=image_mode)

    @classmethod
    def from_checkpoint(cls, checkpoint, visual_budget: int | None = None) -> Answerer:
        """The checkpoint's model, prompted with the template, system prompt and images it trained on."""
        model, tokenizer = load_model_files(checkpoint)
        how = checkpoint_prompting(checkpoint, model.vision.config)
        return cls(model, tokenizer, how.template, how.image_mode, how.system_prompt, how.images, visual_budget)

    def prompt_batch(self, prompts: list[str], images: list[Image.Image | None]) -> Batch:
        """The questions as one left-padded batch (padding first, so every row ends where decoding starts)."""
        examples = []
        for prompt, image in zip(prompts, images):
            ids = self.template.prompt_ids(prompt, self.tokens_per_image, has_image=image is not None)
            pixels = [self.images(image)] if image is not None else []
            examples.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * len(ids), images=pixels))
        batch = collate(examples, self.tokenizer.pad_token_id, self.model.image_token_id)
        return left_padded(dataclasses.replace(batch, visual_budget=self.visual_budget))

    def prompt_embeddings(self, prompts: list[str], images: list[Image.Image | None]):
        """Left-padded prompt embeddings and attention mask for a batch of questions."""
        batch = self.prompt_batch(prompts, images)
        with context.activate(self.model.forward_context(batch)):
            return self.model.embed(batch), batch.attention_mask

    @torch.no_grad()
    def answer(self, prompts: list[str], images: list[Image.Image | None], options: DecodeOptions) -> list[str]:
        batch = self.prompt_batch(prompts, images)
        prompt = self.model.forward_context(batch)
        sampling = options.temperature > 0
        generator_kwargs = {"temperature": options.temperature, "top_p": options.top_p} if sampling else {}
        torch.manual_seed(options.seed)
        with context.activate(prompt):
            embeds, mask = self.model.embed(batch), batch.attention_mask
        with context.during_generation(self.model.decoder, prompt):
            out = self.model.lm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=options.max_new_tokens,
                do_sample=sampling,
                eos_token_id=self.template.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                **generator_kwargs,
            )
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]


def left_padded(batch: Batch) -> Batch:
    """Move each row's padding to its front (generation appends on the right)."""
    shift = (batch.attention_mask == 0).sum(dim=1)
    rolled = {}
    for name in ("input_ids", "labels", "attention_mask", "token_roles", "position_ids", "sequence_ids"):
        value = getattr(batch, name)
        rolled[name] = torch.stack([row.roll(int(k)) for row, k in zip(value, shift)])
    return dataclasses.replace(batch, **rolled)
