"""Training FLOPs per step (model FLOPs, for MFU with and without the vision tower).

What a step runs, counted as `torch.utils.flop_counter` counts it (2 FLOPs per multiply-add,
matmuls and attention only):

- A matmul weight W (Linear, or the tower's patch Conv2d) applied to one token costs 2|W|
  forward, 2|W| more for the gradient of its input when a gradient reaches that input
  (something before it trains), and 2|W| more for its own gradient when it trains. So a
  trained LM costs 6N per token; a frozen LM that backpropagates to the connector 4N; LoRA
  4 per frozen base weight plus 6 per adapter weight; a frozen tower (run under no_grad) 2N.
- Attention scores and the weighted sum cost 4*T*d per token per layer forward, over the
  full T x T square (what the FLOP counter counts for SDPA, causal mask or not: PaLM's
  convention), twice that again backward when a gradient flows through. (The counter
  charges SDPA's fused GPU backward 2.5x its forward, as it recomputes the scores; like
  checkpointing, that recompute is not a model FLOP.)
- Each part counts only what it runs: the tower its layers up to `feature_layer`, over its
  patches plus the CLS token if it has one; the connector the features it receives; the LM
  head only the supervised positions (the chunked loss never computes the others).

Not counted: padding, the dummy image of a text-only batch, recomputation under gradient
checkpointing (that is hardware FLOPs, not model FLOPs), elementwise work (norms, softmax).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from llava_train.modules.base import TechniqueModule

MATMULS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class StepFlops:
    """Forward + backward FLOPs of each part, per unit of work it does.

    Attached modules add the forward FLOPs per LM token they declare (`flops_per_token`: experts,
    routers; work outside plain Linear layers, which the walk over matmuls cannot see), x3 when
    they train (forward, input gradient, weight gradient), x2 when frozen. A module that runs some
    decoder layers on fewer tokens (mixture-of-depths) says so per batch (`layer_tokens`), and
    `for_batch` counts those layers over the tokens they ran.
    """

    lm_per_token: float  # decoder weights
    lm_per_token_per_key: float  # decoder attention, per position of the row attended over
    head_per_supervised_token: float  # LM head, at supervised positions only
    per_image: float  # vision tower + connector
    per_layer_token: tuple[float, ...] = ()  # each decoder layer's share of lm_per_token
    layer_tokens: Callable | None = field(default=None, compare=False)  # batch -> {layer: (tokens, row length)}

    @classmethod
    def for_model(cls, model) -> "StepFlops":
        """The count for `model` as its stage left it: what trains is what requires grad."""
        image, grad_out = _image_flops(model)
        lm_cfg = model.lm.config
        decoder = model.decoder
        found = _matmuls([decoder], grad_in=grad_out)
        per_token = sum(_weight_flops(sub.weight, reached) for sub, reached in found)
        per_layer = _per_layer(decoder, found)
        grad_out = grad_out or _trains(decoder)
        per_token += _module_flops(model)
        head = model.output_embeddings.weight
        return cls(
            lm_per_token=per_token,
            lm_per_token_per_key=_attention(lm_cfg.num_hidden_layers, _attention_width(lm_cfg), grad_out),
            head_per_supervised_token=_weight_flops(head, grad_out),
            per_image=image,
            per_layer_token=per_layer,
            layer_tokens=_layer_tokens(model),
        )

    def lm(self, tokens: int, row_len: int, supervised_tokens: int, layer_tokens: dict | None = None) -> float:
        """`tokens` real (non-padding) tokens in rows of `row_len`; the head runs on `supervised_tokens`;
        `layer_tokens` {layer: (tokens, row length)} for layers that ran on fewer tokens."""
        per_token = self.lm_per_token + self.lm_per_token_per_key * row_len
        flops = per_token * tokens + self.head_per_supervised_token * supervised_tokens
        per_key = self.lm_per_token_per_key / max(len(self.per_layer_token), 1)
        for layer, (layer_tokens_run, layer_row_len) in (layer_tokens or {}).items():
            weights = self.per_layer_token[layer]
            flops += (weights + per_key * layer_row_len) * layer_tokens_run - (weights + per_key * row_len) * tokens
        return flops

    def for_batch(self, batch) -> float:
        """The LM's FLOPs for one micro-batch, as its attached modules ran it."""
        layers = self.layer_tokens(batch) if self.layer_tokens is not None else None
        return self.lm(batch.num_tokens, batch.input_ids.shape[1], batch.num_supervised_tokens, layers)

    def vision(self, images: int) -> float:
        return self.per_image * images


def _per_layer(decoder: nn.Module, found: list[tuple[nn.Module, bool]]) -> tuple[float, ...]:
    """Each decoder layer's matmul FLOPs per token (from the walk, so with the same gradient flags)."""
    layers = getattr(decoder, "layers", [])
    layer_of = {id(sub): index for index, layer in enumerate(layers) for sub in layer.modules()}
    flops = [0.0] * len(layers)
    for sub, reached in found:
        if id(sub) in layer_of:
            flops[layer_of[id(sub)]] += _weight_flops(sub.weight, reached)
    return tuple(flops)


def _layer_tokens(model) -> Callable | None:
    """batch -> {decoder layer: (tokens, row length)} merged over the attached modules that declare any."""
    modules = getattr(model, "attachments", [])
    if not any(type(m).layer_tokens is not TechniqueModule.layer_tokens for m in modules):
        return None
    return lambda batch: {k: v for m in modules for k, v in m.layer_tokens(model, batch).items()}


def _module_flops(model) -> float:
    return sum(
        m.flops_per_token(model) * (3 if m.options.trainable else 2) + 2 * m.frozen_flops_per_token(model)
        for m in getattr(model, "attachments", [])
    )


def _image_flops(model) -> tuple[float, bool]:
    """(FLOPs per image of tower + connector, whether a gradient flows out of the connector)."""
    tower = model.vision
    ran = tower.executed_modules()
    positions = tower.sequence_length  # patches (+ CLS) through every layer
    flops = 0.0
    for sub, grad_in in _matmuls(ran, grad_in=False):  # pixels carry no gradient
        uses = tower.num_patches if isinstance(sub, nn.Conv2d) else positions  # a patch conv runs once per patch
        flops += _weight_flops(sub.weight, grad_in) * uses
    grad_out = any(_trains(module) for module in ran)
    flops += _attention(tower.layers_run, tower.hidden_size, grad_out) * positions * positions
    connector, grad_out = _walk_matmuls([model.connector], grad_in=grad_out)
    return flops + connector * tower.num_features, grad_out


def _walk_matmuls(modules: Iterable[nn.Module], grad_in: bool) -> tuple[float, bool]:
    """(FLOPs per token of the matmul weights in `modules`, whether a gradient flows out of them)."""
    modules = list(modules)
    flops = sum(_weight_flops(sub.weight, reached) for sub, reached in _matmuls(modules, grad_in))
    return flops, grad_in or any(_trains(module) for module in modules)


def _matmuls(modules: Iterable[nn.Module], grad_in: bool) -> list[tuple[nn.Module, bool]]:
    """Each matmul layer in `modules`, in order, with whether a gradient reaches its input.

    Modules register in the order they run, so a gradient reaches a layer's input once one
    enters the part or any parameter before the layer trains; a module's own parameters (a
    CLS embedding) count as used after its children. Exact for a chain; layers side by side
    (q/k/v) count as if in a row, which matters only when the model's first trainable weight
    sits among them.
    """
    found = []

    def visit(module: nn.Module) -> None:
        nonlocal grad_in
        if isinstance(module, MATMULS):
            found.append((module, grad_in))
        for child in module.children():
            visit(child)
        grad_in = grad_in or any(p.requires_grad for p in module.parameters(recurse=False))

    for module in modules:
        visit(module)
    return found


def _weight_flops(weight, grad_in: bool) -> float:
    """Forward, input-gradient and weight-gradient FLOPs of one weight applied to one token."""
    passes = 1 + int(grad_in) + int(weight.requires_grad)
    return 2.0 * _numel(weight) * passes


def _attention(layers: int, width: int, backward: bool) -> float:
    """QK^T and AV per token per key, over `layers` layers; the backward costs twice the forward."""
    return 4.0 * layers * width * (3 if backward else 1)


def _attention_width(config) -> int:
    """Query heads x head size (the K/V heads of grouped-query attention are repeated to match)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _numel(param) -> int:
    return getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partition holds only a slice
