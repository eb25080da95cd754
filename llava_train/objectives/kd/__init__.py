"""Knowledge distillation from a frozen teacher MLLM: LLaVA-KD (MDist + RDist) and GKD's on-policy option.

LLaVA-KD (Cai et al., 2024): a small MLLM learns from a large one through MDist, a divergence between
their next-token distributions on response (and visual) positions, and RDist, 1 - cosine between their
visual tokens' self-similarity matrices; three stages (DPT, SFT, DFT: recipes/kd/). GKD (Agarwal et
al., 2024): with probability lambda a step distils on a completion the student sampled itself.

Seams: the objective seam (the teacher is a frozen second model from a llava_train checkpoint or an
exported Llava folder, loaded straight into ZeRO-3 partitions; its head is an external parameter),
token roles (visual positions), the per-step generator (the on-policy draw), `kernels.distillation`
(chunked: never `[tokens, vocab]` logits of either model). Terms: `ce_weight * CE + mdist_weight *
MDist` on response tokens share the CE's global token normaliser (accumulation is exact); the visual
terms `visual_mdist_weight * mean MDist over visual positions` and `rdist_weight * mean RDist over
images` are per-micro-batch means reported as aux losses (`aux/kd_visual_mdist`, `aux/kd_rdist`).

Invariants (tests/test_kd.py): self-distillation gives zero divergence and gradient; chunked = naive
for every divergence; teacher never trained, saved or in the optimizer; two-rank ZeRO-3 = one process.
Refused at recipe load (checks.py): tokenizer or template mismatch, vocabulary mismatch without
`vocab_slice`, differing or varying (Matryoshka) visual-token counts while a visual term is on.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from kernels.distillation import Divergence, DivergenceSpec, chunked_distillation
from llava_train.data.batch import TokenRole
from llava_train.model.io import load_any
from llava_train.model.offload import with_param_offload
from llava_train.objectives.base import Objective, ObjectiveOptions, ObjectiveOutput, register_objective
from llava_train.objectives.kd import checks, on_policy, relation
from llava_train.objectives.kd.teacher_batch import PixelMap, teacher_batch
from llava_train.objectives.lm import cross_entropy_sum, supervised_positions


class KDOptions(ObjectiveOptions):
    teacher: str  # a llava_train checkpoint (RUN/checkpoints/step-N) or an exported transformers Llava folder
    teacher_offload: bool = False  # keep the teacher's weights in CPU memory, moved to the GPU as it runs
    divergence: Divergence = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_forward_kl | skew_reverse_kl
    beta: float = Field(0.5, ge=0, le=1)  # jsd: 0 is exactly forward KL, 1 reverse KL
    skew: float = Field(0.1, ge=0, lt=1)  # skew_*: the mixing weight
    temperature: float = Field(1.0, gt=0)
    scale_t2: bool = False  # multiply the divergence by T^2
    top_k: int | None = Field(None, ge=1)  # forward_kl against the teacher's k most likely tokens only
    vocab_slice: int | None = Field(None, ge=1)  # distil over the first N tokens when the heads' sizes differ
    ce_weight: float = Field(1.0, ge=0)
    mdist_weight: float = Field(1.0, ge=0)  # MDist on response positions
    visual_mdist_weight: float = Field(1.0, ge=0)  # MDist on visual positions (0: off)
    rdist_weight: float = Field(1.0, ge=0)  # RDist (0: off)
    rdist_level: Literal["logits", "hidden", "projector"] = "logits"  # logits: the released trainer's
    same_template: bool = True  # refuse a data.template other than the teacher's (off for DPT on captions)
    on_policy: float = Field(0.0, ge=0, le=1)  # GKD lambda: the chance a step distils on the student's own sample
    max_new_tokens: int = Field(64, ge=1)  # on-policy completions
    sample_temperature: float = Field(1.0, gt=0)  # on-policy sampling

    @model_validator(mode="after")
    def _top_k_needs_forward_kl(self):
        if self.top_k is not None and self.divergence != "forward_kl":
            raise ValueError(f"top_k needs divergence forward_kl ({self.divergence} reads the teacher's whole tail)")
        return self

    @property
    def visual_terms(self) -> bool:
        return bool(self.visual_mdist_weight or self.rdist_weight)

    @property
    def spec(self) -> DivergenceSpec:
        o = self
        return DivergenceSpec(o.divergence, o.beta, o.skew, o.temperature, o.scale_t2, o.top_k)


@register_objective
class KnowledgeDistillation(Objective):
    name = "kd"
    Options = KDOptions
    normaliser = "tokens"
    notes = "teacher: frozen second model (ZeRO-3 partitioned); visual terms need equal, fixed visual-token counts"

    def __init__(self, options: KDOptions, build):
        super().__init__(options, build)
        zero3, offload = build.zero3_config, options.teacher_offload
        teacher, _ = load_any(options.teacher, with_param_offload(zero3) if offload and zero3 else zero3)
        checks.check_models(options, build.model, teacher)
        self.add_frozen_model("teacher", teacher, stream_with=build if offload and not zero3 else None)
        self.pixel_map = PixelMap.between(*checks.image_processors(build, options.teacher, teacher))
        self.pad_id = build.tokenizer.pad_token_id
        self.stop_ids = on_policy.stop_ids(build.tokenizer, build.recipe.data.template)

    @property
    def teacher(self):
        return self.frozen_model("teacher")

    def forward(self, model, batch) -> ObjectiveOutput:
        if on_policy.drawn(model, batch, self.options.on_policy):
            return self._on_policy(model, batch)
        o = self.options
        projector = bool(o.rdist_weight) and o.rdist_level == "projector"
        captured = relation.Capture(model.connector, self.teacher.connector, on=projector)
        with captured:
            out, t_out, t_batch, student_rows, teacher_rows = self._both_forwards(model, batch)
        ce = cross_entropy_sum(out.hidden_states, model.output_embeddings, batch.labels, self.loss_config)
        mdist = self.divergence(model, student_rows, teacher_rows)
        loss_sum = o.ce_weight * ce.loss + o.mdist_weight * mdist
        count = max(ce.num_tokens, 1)
        metrics = {**out.aux_metrics, "ce": float(ce.loss.detach()) / count, "mdist": float(mdist.detach()) / count}
        aux = dict(out.aux_losses)
        if o.visual_terms and batch.pixel_values is not None:
            aux.update(self._visual_terms(model, out, t_out, batch, t_batch, captured, metrics))
        return ObjectiveOutput(loss_sum, ce.num_tokens, aux, metrics)

    # ------------------------------------------------------------------ terms

    def divergence(self, model, student_rows, teacher_rows) -> torch.Tensor:
        """Summed MDist over aligned rows, chunked from both models' hidden states and heads."""
        w_s, b_s = self._head(model.output_embeddings)
        w_t, b_t = self._head(self.teacher.output_embeddings)
        dtype = torch.promote_types(teacher_rows.dtype, w_t.dtype)

        def teacher_logits(rows: slice) -> torch.Tensor:
            logits = (teacher_rows[rows].to(dtype) @ w_t.to(dtype).T).float()
            return logits if b_t is None else logits + b_t.float()

        chunk = self.loss_config.chunk_size
        return chunked_distillation(student_rows, w_s, teacher_logits, self.options.spec, bias=b_s, chunk_size=chunk)

    def _visual_terms(self, model, out, t_out, batch, t_batch, captured, metrics) -> dict[str, torch.Tensor]:
        o, image = self.options, int(TokenRole.IMAGE)
        student = out.hidden_states[batch.token_roles == image]  # [images * n, D_s], row-major = image order
        teacher = t_out.hidden_states[t_batch.token_roles == image]
        terms = {}
        if o.visual_mdist_weight:
            value = self.divergence(model, student, teacher) / max(student.shape[0], 1)
            terms["kd_visual_mdist"] = o.visual_mdist_weight * value
            metrics["visual_mdist"] = float(value.detach())
        if o.rdist_weight:
            value = self._relation(model, student, teacher, captured).mean()
            terms["kd_rdist"] = o.rdist_weight * value
            metrics["rdist"] = float(value.detach())
        return terms

    def _relation(self, model, student, teacher, captured) -> torch.Tensor:
        """RDist per image at the configured level."""
        n, level = model.tokens_per_image, self.options.rdist_level
        if level == "projector":
            return relation.relation_loss(relation.gram(captured.student), relation.gram(captured.teacher))
        student, teacher = relation.per_image(student, n), relation.per_image(teacher, n)
        if level == "hidden":
            return relation.relation_loss(relation.gram(student), relation.gram(teacher))
        with torch.no_grad():
            teacher_gram = relation.logits_gram(teacher, *self._head(self.teacher.output_embeddings))
        return relation.relation_loss(relation.logits_gram(student, *self._head(model.output_embeddings)), teacher_gram)

    def _head(self, head) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's weight and bias, cut to the shared vocabulary slice when one is declared."""
        weight, bias = head.weight, getattr(head, "bias", None)
        n = self.options.vocab_slice
        if n is None:
            return weight, bias
        return weight[:n], None if bias is None else bias[:n]

    def _both_forwards(self, model, batch):
        """Student and (no-grad) teacher forwards, and each one's hidden states at the answer positions,
        which align row for row: both batches hold the same text, only their visual spans may differ."""
        out = model(batch)
        t_batch = self._teacher_batch(model, batch)
        with torch.no_grad():
            t_out = self.teacher(t_batch)
        s_mask, _ = supervised_positions(batch.labels)
        t_mask, _ = supervised_positions(t_batch.labels)
        return out, t_out, t_batch, out.hidden_states[:, :-1][s_mask], t_out.hidden_states[:, :-1][t_mask]

    def _teacher_batch(self, model, batch):
        student_tokens = model.connector.visual_tokens().num_tokens(batch.visual_budget)
        t = self.teacher
        return teacher_batch(batch, student_tokens, t.tokens_per_image, t.vision.image_size, self.pad_id,
                             t.image_token_id, self.pixel_map)  # fmt: skip

    # ------------------------------------------------------------------ GKD

    def _on_policy(self, model, batch) -> ObjectiveOutput:
        """Distil on the student's own completions of the batch's prompts (TRL GKD: no CE on them).

        The divergence is averaged over the sampled tokens and weighted by the batch's supervised-token
        count, which the trainer's normaliser already counted before this forward."""
        sampled = on_policy.sample_batch(model, batch, self, self.options)
        out, _, _, rows, teacher_rows = self._both_forwards(model, sampled)
        mdist = self.divergence(model, rows, teacher_rows)
        count = batch.num_supervised_tokens
        mean = mdist / max(rows.shape[0], 1)
        metrics = {**out.aux_metrics, "on_policy_mdist": float(mean.detach()), "on_policy_tokens": float(rows.shape[0])}
        return ObjectiveOutput(self.options.mdist_weight * mean * count, count, dict(out.aux_losses), metrics)

    # ------------------------------------------------------------------ declarations

    @classmethod
    def example_options(cls, workdir) -> dict:
        teacher, vocabulary = checks.example_teacher(workdir)
        return {"teacher": str(teacher), "vocab_slice": vocabulary, "on_policy": 0.5, "max_new_tokens": 4}

    @classmethod
    def check_recipe(cls, options: KDOptions, recipe) -> None:
        checks.check_recipe(options, recipe)
