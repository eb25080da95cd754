"""What only a CUDA GPU can check: DeepSpeed's bf16 mode over NCCL, SDPA's fused kernels and the flash
varlen kernel with packed rows, and the compiled Triton loss at Qwen2's vocabulary in bf16.

Skipped without CUDA. launch/gpu_check/run.sh runs this file on a GPU machine, with
tests/test_kernels_triton.py (whose cases run compiled there).
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llava_train.data.collate import collate, collate_rows
from llava_train.model.packed_attention import block_causal_mask, varlen_boundaries
from llava_train.objectives.lm import supervised_positions
from tests.conftest import tiny_recipe_dict

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: launch/gpu_check/run.sh runs these on one"
)

# Two packed rows: samples of 5, 9 and 2 tokens, then 7 and 6 and three pad positions (sequence id -1).
SEQUENCE_IDS = [[0] * 5 + [1] * 9 + [2] * 2, [3] * 7 + [4] * 6 + [-1] * 3]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


# ----------------------------------------------------------------------------- DeepSpeed bf16 over NCCL


def train_losses(demo_data, out, **train) -> tuple[dict[int, float], dict]:
    from llava_train.recipe import validate_recipe
    from llava_train.train.trainer import Trainer

    recipe = tiny_recipe_dict(demo_data, out, max_steps=3, log_every=1, zero_stage=2, **train)
    trainer = Trainer(validate_recipe(recipe))
    facts = {
        "backend": dist.get_backend(),
        "device": trainer.dist.device.type,
        "bf16_engine": trainer.engine.bfloat16_enabled(),
        "weights": next(trainer.model.lm.parameters()).dtype,
        "master": trainer.engine.optimizer.single_partition_of_fp32_groups[0].dtype,  # ZeRO-2's fp32 partition
    }
    trainer.train(save_final=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}, facts


def test_deepspeed_bf16_zero2_over_nccl_trains_close_to_fp32(demo_data, tmp_path):
    fp32, facts32 = train_losses(demo_data, tmp_path / "fp32")
    bf16, facts16 = train_losses(demo_data, tmp_path / "bf16", precision="bf16")
    assert facts32["backend"] == facts16["backend"] == "nccl" and facts16["device"] == "cuda"
    # DeepSpeed's bf16 mode (not CPU autocast): bf16 weights in the module, fp32 master weights in ZeRO-2.
    assert facts16["bf16_engine"] and facts16["weights"] == torch.bfloat16 and facts16["master"] == torch.float32
    assert not facts32["bf16_engine"] and facts32["weights"] == torch.float32
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=5e-2), step  # bf16 weights: an 8-bit mantissa
    assert bf16 != fp32  # ...and it did run in bf16
    # NCCL itself, beyond what DeepSpeed ran: a collective on a one-GPU group.
    value = torch.full((3,), 2.0, device="cuda")
    dist.all_reduce(value)
    assert value.tolist() == [2.0, 2.0, 2.0]


# ----------------------------------------------------------------------------- attention with packed rows


def packed_qkv(heads=4, dim=64, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (len(SEQUENCE_IDS), heads, len(SEQUENCE_IDS[0]), dim)
    return [torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3)]


def math_reference(q, k, v, mask):
    """SDPA's math path in fp32: the block-diagonal causal mask applied to the dense row."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


def test_sdpa_fused_and_flash_kernels_with_packed_rows_match_the_math_path():
    ids = torch.tensor(SEQUENCE_IDS, device="cuda")
    mask = block_causal_mask(ids)
    q, k, v = (t.requires_grad_() for t in packed_qkv())
    want = math_reference(q, k, v, mask)

    # What the `sdpa` implementation runs on packed rows: a 4D mask, which the memory-efficient kernel takes.
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert relative_error(got, want) < 1e-2
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (q, k, v), grad.bfloat16())
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for g, w in zip(got_grads, want_grads):
        assert relative_error(g, w) < 2e-2

    # SDPA's flash kernel takes no mask: run each packed sample (and the padding) alone, causal, in place.
    flash = torch.zeros_like(want)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for row, (start, end) in sample_spans():
            piece = [t[row : row + 1, :, start:end].detach() for t in (q, k, v)]
            flash[row, :, start:end] = F.scaled_dot_product_attention(*piece, is_causal=True)[0].float()
    assert relative_error(flash, want) < 1e-2


def sample_spans():
    """(row, (start, end)) of every run of one sequence id in SEQUENCE_IDS."""
    for row, ids in enumerate(SEQUENCE_IDS):
        starts = [t for t in range(len(ids)) if t == 0 or ids[t] != ids[t - 1]]
        yield from ((row, span) for span in zip(starts, starts[1:] + [len(ids)]))


def test_flash_varlen_kernel_fed_our_boundaries_matches_the_math_path():
    """The boundaries the flash_attention_2 path hands to a varlen kernel (packed_attention.py), run through
    PyTorch's own flash varlen kernel: the same attention as the block-diagonal mask."""
    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="this torch has no varlen_attn")
    ids = torch.tensor(SEQUENCE_IDS, device="cuda")
    q, k, v = packed_qkv()
    want = math_reference(q, k, v, block_causal_mask(ids))
    cu_seqlens, longest = varlen_boundaries(ids)
    batch, heads, length, dim = q.shape
    flat = [t.transpose(1, 2).reshape(batch * length, heads, dim) for t in (q, k, v)]  # the decoder's [B*T, H, D]
    # torch 2.10 took is_causal; later versions a (left, right) window, (-1, 0) being causal.
    old_api = "is_causal" in inspect.signature(varlen.varlen_attn).parameters
    causal = {"is_causal": True} if old_api else {"window_size": (-1, 0)}

    def attend(bounds, longest):
        out = varlen.varlen_attn(*flat, bounds, bounds, longest, longest, **causal)
        return out.reshape(batch, length, heads, dim).transpose(1, 2)

    assert relative_error(attend(cu_seqlens, longest), want) < 1e-2
    # The test can fail: with one block per row (no sample boundaries) samples see their neighbours.
    rows = torch.arange(0, batch * length + 1, length, device="cuda", dtype=torch.int32)
    assert relative_error(attend(rows, length), want) > 0.1


def test_packed_model_losses_on_the_gpu_match_each_sample_alone_under_flash(tokenizer_dir):
    """The tiny model in bf16: packed rows (block mask, default SDPA dispatch, and the math path) give the
    per-sample losses of each sample run alone through SDPA's flash kernel (no mask at all)."""
    from llava_train.model.build import load_tokenizer
    from tests.test_packing import make_examples, make_model

    tokenizer = load_tokenizer(str(tokenizer_dir))
    model = make_model(tokenizer, "sdpa").to("cuda", torch.bfloat16)
    examples = make_examples(model, tokenizer)
    pad, image = tokenizer.pad_token_id, model.image_token_id
    packed = collate_rows([examples[:3], examples[3:]], pad, image).to("cuda", torch.bfloat16)

    def losses(batch):
        with torch.no_grad():
            hidden = model(batch).hidden_states
        mask, targets = supervised_positions(batch.labels)
        per_token = F.cross_entropy(model.output_embeddings(hidden[:, :-1][mask]).float(), targets, reduction="none")
        owner = batch.sequence_ids[:, :-1][mask]
        return torch.zeros(batch.num_samples, device="cuda").index_add(0, owner, per_token)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if any attention call could not use flash
        alone = torch.cat([losses(collate([e], pad, image).to("cuda", torch.bfloat16)) for e in examples])
    together = losses(packed)
    with sdpa_kernel(SDPBackend.MATH):
        together_math = losses(packed)
    torch.testing.assert_close(together, alone, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(together_math, alone, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- Triton, compiled


def test_triton_loss_compiled_at_qwen2_vocabulary_in_bf16_matches_torch():
    """Training on a GPU runs the Triton loss (backend auto) on bf16 hidden states and head: at Qwen2's
    151936-word vocabulary it must equal the PyTorch chunked loss (both upcast each logits block to fp32)."""
    import kernels
    from kernels import triton_linear_cross_entropy

    assert not triton_linear_cross_entropy.INTERPRETED  # compiled for this GPU, not the CPU interpreter
    assert kernels.resolve_backend("auto", torch.device("cuda")) == "triton"
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1500, 896, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(151936, 896, device="cuda", generator=gen) / 896**0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, 151936, (1500,), device="cuda", generator=gen)
    targets[::5] = -100
    options = dict(label_smoothing=0.1, z_loss=1e-4, chunk_size=512)
    got = kernels.linear_cross_entropy(hidden, weight, targets, backend="triton", **options)
    want = kernels.linear_cross_entropy(hidden, weight, targets, backend="torch", **options)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4)
    got_grads = torch.autograd.grad(got.loss, (hidden, weight))
    want_grads = torch.autograd.grad(want.loss, (hidden, weight))
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.bfloat16 and relative_error(g, w) < 1e-2


# ----------------------------------------------------------------------------- a KD teacher offloaded to CPU


def test_an_offloaded_kd_teacher_leaves_gpu_memory_to_the_student_and_gives_the_same_loss(demo_data, tmp_path):
    """ZeRO-2 bf16: the offloaded teacher's blocks stay in CPU memory between forwards (accelerate's hooks), so
    less is allocated on the GPU after the build, and one KD forward gives the resident teacher's loss."""
    from llava_train.recipe import validate_recipe
    from llava_train.train.trainer import Trainer

    raw = tiny_recipe_dict(demo_data, tmp_path / "teacher", max_steps=1)
    raw["model"]["lm"]["config"].update(hidden_size=256, intermediate_size=1024, num_hidden_layers=6)  # weighs MBs
    raw["data"]["eval"] = []
    teacher = Trainer(validate_recipe(raw)).train().checkpoint
    allocated, losses = {}, {}
    for offload in (False, True):
        recipe = tiny_recipe_dict(demo_data, tmp_path / str(offload), max_steps=1, precision="bf16", zero_stage=2)
        recipe["stage"] = {"name": "sft", "objective": {"type": "kd", "teacher": str(teacher),
                                                        "teacher_offload": offload}}  # fmt: skip
        recipe["data"]["eval"] = []
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        trainer = Trainer(validate_recipe(recipe))
        allocated[offload] = torch.cuda.memory_allocated() - before
        layers = list(trainer.objective.teacher.decoder.layers.parameters())
        assert {p.device.type for p in layers} == ({"meta"} if offload else {"cuda"})
        if not offload:
            layer_bytes = sum(p.numel() * p.element_size() for p in layers)
        batch = next(iter(trainer.loader)).to(trainer.dist.device, dtype=trainer.input_dtype)
        with torch.no_grad():
            losses[offload] = float(trainer.objective(trainer.model, batch).loss_sum)
        del trainer
    assert allocated[False] - allocated[True] > 0.9 * layer_bytes, (allocated, layer_bytes)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
