"""Direct preference optimisation on preference pairs (DPO and its common variants).

DPO (Rafailov et al.): with the policy's and a frozen reference's log-probabilities of the chosen and the
rejected answer, minimise -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))): the policy learns to prefer
the chosen answer more than the reference does, without a reward model. Variants: `robust` (cDPO, label
smoothing eps), `hinge` (SLiC), `ipo` ((margin - 1/(2 beta))^2, log-probs averaged over tokens as TRL does),
an SFT term on the chosen answer (RPO), dense DPO (RLHF-V: token weights gamma on the tokens that differ
between chosen and rejected) and mDPO (a conditional term with a corrupted image, and an anchor).

Seams: grouped examples (each pair's chosen and rejected sequences stay in one micro-batch; both run in one
concatenated forward, the batch itself), the objective seam (normaliser `pairs`; the reference is a frozen
second model from a checkpoint or exported Llava folder, e.g. a KD teacher, partitioned under ZeRO-3, or the
policy with its adapters disabled, or log-probs precomputed beside the shards: dpo_reference.py), the forward
context's per-step generator (mDPO's crops), and `kernels.sequence_logprobs` (chunked, no full logits).
The tensor math is in preference.py.

Invariants (tests/test_dpo.py, tests/test_dpo_variants.py): policy = reference gives ln 2 and zero rewards;
IPO gives (1/(2 beta))^2; robust with eps 0 equals sigmoid; 2 ranks x 2 pairs equal 1 rank x 4 pairs;
precomputed equals live; dense with gamma 1 equals DPO; mDPO with an identity corruption gives ln 2 and no
gradient for its conditional term.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llava_train.data.batch import Batch
from llava_train.model.io import load_any, read_meta
from llava_train.objectives.base import Objective, ObjectiveOptions, ObjectiveOutput, register_objective
from llava_train.objectives.preference import (  # noqa: F401  (preference_loss: this objective's public math)
    crop_box,
    diff_token_weights,
    mdpo_terms,
    preference_loss,
    random_resized_crop,
    response_tokens,
    sequence_scores,
    token_logprobs,
)


class DenseOptions(BaseModel):
    """RLHF-V's dense DPO: the changed tokens weigh `gamma`, the rest 1."""

    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(5.0, gt=0)
    # diff: a token-level diff of chosen vs rejected marks the changed tokens; data: the record's
    # meta.token_weights {"chosen": [...], "rejected": [...]}, one weight per response token
    weights: Literal["diff", "data"] = "diff"


class MDPOOptions(BaseModel):
    """mDPO: the chosen answer must be likelier with the image than with a random crop of it (conditional
    term), and its reward must stay above `anchor` (anchor term)."""

    model_config = ConfigDict(extra="forbid")
    min_area: float = Field(0.01, gt=0, le=1)  # the crop keeps a fraction U(min_area, max_area) of the image
    max_area: float = Field(0.2, gt=0, le=1)
    anchor: float = 0.0  # delta

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_area > self.max_area:
            raise ValueError(f"mdpo.min_area {self.min_area} is above mdpo.max_area {self.max_area}")
        return self


class DPOOptions(ObjectiveOptions):
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "robust", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust (cDPO): the chance a label is flipped
    sft_weight: float = Field(0.0, ge=0)  # RPO: + weight x the chosen answer's mean token NLL
    average_logprobs: bool = False  # mean instead of sum over response tokens (always mean for ipo)
    # a llava_train checkpoint or exported Llava folder (e.g. a KD teacher: LLaVA-MoD's preference
    # distillation); it must share the policy's tokenizer and template. None: adapters disabled
    reference: str | None = None
    precomputed_reference: bool = False  # read `llava-train dpo-precompute`'s files; no reference model is built
    dense: DenseOptions | None = None
    mdpo: MDPOOptions | None = None


def pair_indices(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen sample index, rejected sample index) per pair, in group order."""
    groups = batch.num_groups
    if groups == 0:
        raise ValueError(
            "dpo trains on preference pairs, but this micro-batch holds none: point data.train at pair shards "
            "(`llava-train data convert-pairs`)"
        )
    chosen = torch.full((groups,), -1, dtype=torch.long)
    rejected = torch.full((groups,), -1, dtype=torch.long)
    for sample, (group, member) in enumerate(zip(batch.group_index.tolist(), batch.group_members)):
        (chosen if member == "chosen" else rejected)[group] = sample
    if (chosen < 0).any() or (rejected < 0).any():
        raise ValueError("a preference group lacks its chosen or rejected member; pairs must stay whole")
    return chosen, rejected


def check_reference_tokenizer(reference_tokenizer, tokenizer, path: str) -> None:
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"stage.objective.reference {path} has another tokenizer than the policy (model.tokenizer): its "
            "log-probs would score other token ids; a reference (a KD teacher too) must share the policy's tokenizer"
        )


@register_objective
class DPO(Objective):
    name = "dpo"
    notes = ("reference: adapters disabled, a checkpoint, or precomputed (dpo_reference.py, dpo_precompute.py); "
             "loss math in preference.py")
    Options = DPOOptions
    normaliser = "pairs"
    accepts_groups = True

    def __init__(self, options: DPOOptions, build):
        super().__init__(options, build)
        self.precomputed = None
        if options.precomputed_reference:  # no reference model at all
            from llava_train.data import pipeline
            from llava_train.objectives import dpo_reference
            from llava_train.objectives.dpo_precompute import train_shards

            recipe = build.recipe
            encoder = pipeline.make_encoder(recipe.data, build.tokenizer, build.model, recipe.model.vision.path)
            key = dpo_reference.cache_key(recipe, build.tokenizer, encoder)
            self.precomputed = dpo_reference.PrecomputedReference(train_shards(recipe.data), key)
        elif options.reference is not None:
            reference, tokenizer = load_any(options.reference, build.zero3_config)
            check_reference_tokenizer(tokenizer, build.tokenizer, options.reference)
            self.add_frozen_model("reference", reference)

    def forward(self, model, batch: Batch) -> ObjectiveOutput:
        terms, metrics, aux_losses = self.terms(model, batch)
        losses = sum(terms.values())
        return ObjectiveOutput(losses.sum(), int(losses.numel()), aux_losses, metrics)

    def terms(self, model, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, float], dict]:
        """Per-pair loss terms (preference, and sft / conditional / anchor when on), metrics, module aux losses."""
        chosen, rejected = (i.to(batch.labels.device) for i in pair_indices(batch))
        out = model(batch)  # chosen and rejected together: one concatenated forward
        policy_tokens, sample = token_logprobs(out.hidden_states, model.output_embeddings, batch, self._chunk)
        weights = self._token_weights(batch, sample, chosen, rejected)
        policy, reference = self._scores(model, batch, policy_tokens, sample, weights)
        chosen_ratio = policy[chosen] - reference[chosen]
        rejected_ratio = policy[rejected] - reference[rejected]
        margin = chosen_ratio - rejected_ratio
        opts, beta = self.options, self.options.beta
        terms = {"preference": preference_loss(margin, beta, opts.loss, opts.label_smoothing)}
        if opts.sft_weight:  # RPO: the chosen answer's mean token NLL
            nll = -sequence_scores(policy_tokens, sample, torch.ones_like(weights), batch.num_samples, mean=True)
            terms["sft"] = opts.sft_weight * nll[chosen]
        metrics = {
            "rewards/chosen": float(beta * chosen_ratio.detach().mean()),
            "rewards/rejected": float(beta * rejected_ratio.detach().mean()),
            "rewards/margin": float(beta * margin.detach().mean()),
            "rewards/accuracy": float((margin.detach() > 0).float().mean()),
            **out.aux_metrics,
        }
        aux_losses = dict(out.aux_losses)
        if opts.mdpo is not None:  # on every micro-batch, images or not: ZeRO-3 ranks must run the same forwards
            terms["conditional"], terms["anchor"], corrupted_aux = self._mdpo(model, batch, chosen, chosen_ratio, weights)
            metrics["mdpo/conditional"] = float(terms["conditional"].detach().mean())
            metrics["mdpo/anchor"] = float(terms["anchor"].detach().mean())
            for name, value in corrupted_aux.items():  # module aux losses: once per policy forward
                aux_losses[name] = aux_losses[name] + value if name in aux_losses else value
        return terms, metrics, aux_losses

    # ------------------------------------------------------------------ pieces

    @property
    def _chunk(self) -> int:
        return self.loss_config.chunk_size

    def _scores(self, model, batch, policy_tokens, sample, weights):
        """Per-sample policy and reference scores: weighted sums, or means for average_logprobs / IPO."""
        with torch.no_grad():
            reference_tokens = self._reference_tokens(model, batch, sample)
        mean = self.options.average_logprobs or self.options.loss == "ipo"
        policy = sequence_scores(policy_tokens, sample, weights, batch.num_samples, mean)
        return policy, sequence_scores(reference_tokens, sample, weights, batch.num_samples, mean)

    def _reference_tokens(self, model, batch: Batch, sample: torch.Tensor) -> torch.Tensor:
        if self.precomputed is not None:
            return self.precomputed.token_logprobs(batch, sample)
        if "reference" in self.frozen:
            reference = self.frozen["reference"]
            return token_logprobs(reference(batch).hidden_states, reference.output_embeddings, batch, self._chunk)[0]
        with model.adapters_disabled():  # the policy without its adapters: no second copy
            return token_logprobs(model(batch).hidden_states, model.output_embeddings, batch, self._chunk)[0]

    def _token_weights(self, batch: Batch, sample: torch.Tensor, chosen, rejected) -> torch.Tensor:
        """One weight per response token (aligned with `sample`): 1, or dense DPO's."""
        weights = torch.ones(sample.shape[0], device=sample.device)
        dense = self.options.dense
        if dense is None:
            return weights
        if dense.weights == "diff":
            per_sample = diff_token_weights(response_tokens(batch), chosen.tolist(), rejected.tolist(), dense.gamma)
        else:
            per_sample = [_data_weights(meta, member, key) for meta, member, key
                          in zip(batch.meta, batch.group_members, batch.keys)]
        for s, values in enumerate(per_sample):
            where = sample == s
            if int(where.sum()) != len(values):
                raise ValueError(
                    f"pair {batch.keys[s]!r} ({batch.group_members[s]}): {len(values)} token weights for "
                    f"{int(where.sum())} response tokens; meta.token_weights needs one per response token "
                    "(as the recipe's template and max_length encode it)"
                )
            weights[where] = torch.tensor(values, dtype=weights.dtype, device=weights.device)
        return weights

    def _mdpo(self, model, batch: Batch, chosen, chosen_ratio, weights):
        """(conditional, anchor) per pair, and the corrupted policy forward's module aux losses."""
        pixels = self.corrupt_images(model, batch) if batch.pixel_values is not None else None
        corrupted = dataclasses.replace(batch, pixel_values=pixels)
        out = model(corrupted)  # the same corrupted pixels feed the reference below; the tokens (so weights) match
        tokens, sample = token_logprobs(out.hidden_states, model.output_embeddings, corrupted, self._chunk)
        policy, reference = self._scores(model, corrupted, tokens, sample, weights)
        conditional, anchor = mdpo_terms(chosen_ratio, (policy - reference)[chosen], self.options.beta,
                                         self.options.mdpo.anchor)
        has_image = torch.zeros(batch.num_samples, dtype=torch.bool, device=chosen.device)
        has_image[[span[3] for span in model.forward_context(batch).image_spans()]] = True
        return conditional * has_image[chosen], anchor, out.aux_losses

    def corrupt_images(self, model, batch: Batch) -> torch.Tensor:
        """Each pair's images, randomly cropped (1-20% of the area by default) and resized back. One draw per
        image of a pair (its chosen and rejected copies share it), from the forward context's generator keyed
        by (seed, step, micro-step, rank): a resumed run redraws the same crops."""
        ctx = model.forward_context(batch)
        generator = ctx.generator("dpo/mdpo_crop")
        opts, pixels = self.options.mdpo, batch.pixel_values
        boxes, seen = {}, {}
        out = torch.empty_like(pixels)
        for image, (_, _, _, s) in enumerate(ctx.image_spans()):
            ordinal = seen[s] = seen.get(s, -1) + 1
            key = (int(batch.group_index[s]), ordinal)
            if key not in boxes:
                boxes[key] = crop_box(*pixels.shape[-2:], generator, opts.min_area, opts.max_area)
            out[image] = random_resized_crop(pixels[image], boxes[key])
        return out

    @classmethod
    def check_recipe(cls, options: DPOOptions, recipe) -> None:
        adapters = recipe.stage.name == "sft_lora" or bool(recipe.modules)
        if options.precomputed_reference and options.mdpo is not None:
            raise ValueError(
                "mdpo scores the chosen answer with a corrupted image drawn per step, which no precomputed reference "
                "holds: use a live reference (stage.objective.reference, or adapters) or drop precomputed_reference"
            )
        if options.reference is None and not adapters and not options.precomputed_reference:
            raise ValueError(
                "without `reference`, the reference is the policy with its adapters disabled, but this stage trains "
                "no adapters: use stage.name=sft_lora (or a module), set stage.objective.reference to a checkpoint, "
                "or precompute the initial policy's log-probs (`llava-train dpo-precompute`, precomputed_reference)"
            )
        if options.reference is None and not options.precomputed_reference:
            _check_only_adapters_train(recipe)
        if options.reference is not None and not options.precomputed_reference:
            _check_reference_template(options.reference, recipe.data.template)


def _check_only_adapters_train(recipe) -> None:
    """The adapters-disabled reference is the policy minus its adapters: any other part that trains would move
    the reference with it (the initial policy is no longer the reference)."""
    from llava_train.model.stages import resolve_stage

    preset = resolve_stage(recipe.stage)
    moving = [part for part in ("vision", "connector") if getattr(preset, part)]
    moving += ["lm"] if preset.lm and not preset.lora else []
    if moving:
        raise ValueError(
            f"the reference is the policy with its adapters disabled, but this stage also trains {', '.join(moving)}, "
            "which would move the reference along: freeze it (stage.trainable: {" + ", ".join(
                f"{part}: false" for part in moving) + "}), or set stage.objective.reference to a checkpoint, or "
            "precompute the reference (`llava-train dpo-precompute`, precomputed_reference: true)"
        )


def _check_reference_template(path: str, template: str) -> None:
    try:
        recorded = read_meta(path).get("template")
    except (FileNotFoundError, OSError):  # an exported Llava folder records none; load_any checks the path
        return
    if recorded and recorded != template:
        raise ValueError(
            f"stage.objective.reference {path} was trained with template {recorded!r}, this recipe uses "
            f"{template!r}: a reference (a KD teacher too) must read the same prompts; set data.template={recorded}"
        )


def _data_weights(meta: dict, member: str, key: str) -> list[float]:
    weights = (meta or {}).get("token_weights", {}).get(member)
    if weights is None:
        raise ValueError(
            f"dense.weights=data, but pair {key!r} has no meta.token_weights.{member}: give every pair "
            "per-token weights, or use dense.weights=diff"
        )
    return [float(w) for w in weights]
