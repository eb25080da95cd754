"""moe_upcycle's LM as transformers' `Qwen2MoeForCausalLM`, computing the same function.

The upcycled experts are already stored in Qwen2-MoE's stacked layout (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`), the router is Qwen2-MoE's bias-free `gate [E, H]` (softmax, top-k, optional
renormalisation as `norm_topk_prob`), and layers left dense are Qwen2-MoE's `mlp_only_layers`. Qwen2-MoE
adds a sigmoid-gated shared expert to every sparse block: it is written with zero weights (and a zero gate),
so it adds nothing. LoRA experts (`expert_lora`) are merged: expert e = shared MLP + its deltas.

What Qwen2-MoE cannot hold raises ValueError with the reason (the export then keeps the llava_train
format): an LM other than Llama/Qwen2 (attention and norms must map one to one), biases on o_proj or the
MLP, `gate: none` (Qwen2-MoE always weights experts by probability) and an `eval_capacity_factor`
(Qwen2-MoE never drops tokens; training's capacity factor is no concern: inference keeps every token in
both). Invariant (tests/test_moe_upcycle.py): the exported Llava's logits equal llava_train's in fp32.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

FAMILIES = ("llama", "qwen2")  # decoder layers that map one to one onto Qwen2-MoE's
SHARED_EXPERT_SIZE = 1  # Qwen2-MoE always has a shared expert; the smallest one, all zeros


def check_representable(lm: nn.Module, options) -> None:
    """Raise ValueError naming what Qwen2-MoE cannot represent about this LM and these options."""
    cfg = lm.config
    why = []
    if hasattr(lm, "peft_config"):
        why.append("the LM carries unmerged LoRA adapters (export without --keep-lora merges them)")
    if cfg.model_type not in FAMILIES:
        why.append(f"the LM is `{cfg.model_type}`; Qwen2-MoE holds {' and '.join(FAMILIES)} decoder layers")
    if cfg.model_type == "llama" and getattr(cfg, "attention_bias", False):
        why.append("the LM's attention has an o_proj bias (Qwen2-MoE's o_proj has none)")
    if getattr(cfg, "mlp_bias", False):
        why.append("the LM's MLPs have biases (Qwen2-MoE's have none)")
    if options.mlp_name != "mlp":
        why.append(f"mlp_name is `{options.mlp_name}` (Qwen2-MoE's blocks sit at `mlp`)")
    if options.gate == "none":
        why.append("gate is `none` (Qwen2-MoE weights experts by router probability)")
    if options.eval_capacity_factor is not None:
        why.append(
            f"eval_capacity_factor is {options.eval_capacity_factor} (Qwen2-MoE keeps every token at inference; "
            "set it to null to export, as training's capacity factor is)"
        )
    if why:
        raise ValueError("Qwen2-MoE cannot represent this model: " + "; ".join(why))


def qwen2_moe_config(cfg, options, sparse_layers: list[int]) -> Qwen2MoeConfig:
    """The LM's config as Qwen2-MoE's: same attention, norms, rope and vocabulary; experts as upcycled."""
    qwen2 = cfg.model_type == "qwen2"
    return Qwen2MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,  # the layers left dense
        moe_intermediate_size=cfg.intermediate_size,  # experts are copies of the dense MLP
        shared_expert_intermediate_size=SHARED_EXPERT_SIZE,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters),
        attention_dropout=cfg.attention_dropout,
        qkv_bias=True if qwen2 else bool(getattr(cfg, "attention_bias", False)),
        use_sliding_window=bool(getattr(cfg, "use_sliding_window", False)),
        sliding_window=getattr(cfg, "sliding_window", None),
        max_window_layers=getattr(cfg, "max_window_layers", cfg.num_hidden_layers),
        layer_types=getattr(cfg, "layer_types", None),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        num_experts=options.experts,
        num_experts_per_tok=options.top_k,
        norm_topk_prob=options.renormalise,
        decoder_sparse_step=1,  # every layer not in mlp_only_layers is sparse
        mlp_only_layers=[i for i in range(cfg.num_hidden_layers) if i not in sparse_layers],
        router_aux_loss_coef=options.balance_coef,
        output_router_logits=False,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )


def stacked_experts(block) -> tuple[torch.Tensor, torch.Tensor]:
    """An upcycled block's experts as (gate_up_proj [E, 2I, H], down_proj [E, H, I]); LoRA experts merged."""
    if block.shared is None:
        return block.gate_up_proj.detach(), block.down_proj.detach()
    scale = block.options.lora_alpha / block.options.expert_lora
    weight = {  # W_e = W + scale * B_e A_e, for every expert e at once
        p: getattr(block.shared, p).weight.detach() + scale * (block.lora_B[p].detach() @ block.lora_A[p].detach())
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    return torch.cat([weight["gate_proj"], weight["up_proj"]], dim=1), weight["down_proj"]


def to_qwen2_moe(lm: nn.Module, options, blocks: dict[int, nn.Module]) -> Qwen2MoeForCausalLM:
    """`lm` (Llama/Qwen2 with upcycled blocks at the layer indices of `blocks`) as an equal Qwen2-MoE."""
    check_representable(lm, options)
    dtype = lm.get_input_embeddings().weight.dtype
    hf = Qwen2MoeForCausalLM(qwen2_moe_config(lm.config, options, sorted(blocks))).to(dtype).eval()
    ours, theirs = lm.get_decoder(), hf.get_decoder()
    theirs.embed_tokens.load_state_dict(ours.embed_tokens.state_dict())
    theirs.norm.load_state_dict(ours.norm.state_dict())
    hf.get_output_embeddings().load_state_dict(lm.get_output_embeddings().state_dict())
    for index, (src, dst) in enumerate(zip(ours.layers, theirs.layers)):
        for part in ("self_attn", "input_layernorm", "post_attention_layernorm"):
            getattr(dst, part).load_state_dict(getattr(src, part).state_dict())  # Llama without biases: qkv_bias off
        if index not in blocks:
            dst.mlp.load_state_dict(src.mlp.state_dict())
            continue
        gate_up, down = stacked_experts(blocks[index])
        with torch.no_grad():
            dst.mlp.gate.weight.copy_(blocks[index].router.weight)
            dst.mlp.experts.gate_up_proj.copy_(gate_up)
            dst.mlp.experts.down_proj.copy_(down)
            for param in [*dst.mlp.shared_expert.parameters(), dst.mlp.shared_expert_gate.weight]:
                param.zero_()  # the shared expert adds nothing
    return hf
