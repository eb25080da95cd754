"""The training loop: one loop over a DeepSpeed engine, from one CPU process to many GPUs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llava_train.data import pipeline
from llava_train.data.shards import skipped_counts
from llava_train.model.build import apply_stage, build_model, load_tokenizer
from llava_train.model.io import load_weights, model_files_dir, save_model_files, WEIGHTS
from llava_train.model.mllm import MultimodalLM
from llava_train.objectives.lm import OBJECTIVES, ObjectiveOutput
from llava_train.recipe import Recipe
from llava_train.train import checkpoint as ckpt
from llava_train.train.ds_config import build_ds_config
from llava_train.train.engine import (
    DistInfo,
    build_optimizer,
    initialize_engine,
    param_groups,
    setup_distributed,
)
from llava_train.train.flops import StepFlops
from llava_train.train.metrics import MetricsLogger, measure_peak_flops, peak_memory_bytes

log = logging.getLogger(__name__)


class ObjectiveModule(nn.Module):
    """The model plus its objective, so the whole loss runs inside the engine's forward.

    DeepSpeed (ZeRO-3 in particular) expects every parameter use within `engine(...)`;
    computing the LM head outside it would fetch partitions behind the engine's back.
    """

    def __init__(self, model: MultimodalLM, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch) -> ObjectiveOutput:
        return self.objective(self.model, batch)


@dataclass
class TrainResult:
    step: int
    last_loss: float
    eval_loss: float | None
    checkpoint: Path | None


class Trainer:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.cfg = recipe.train
        pipeline.check_data_paths(recipe.data)
        self.resume_from = ckpt.resolve_resume(self.cfg.output_dir, self.cfg.resume)
        self.dist: DistInfo = setup_distributed()
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank
        self.output_dir = Path(self.cfg.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self._build_model()
        self._build_data()
        self._build_engine()
        self.step = 0
        self.tokens_seen = 0
        self.samples_seen = 0
        if self.resume_from is not None:
            self._resume(self.resume_from)

    # ------------------------------------------------------------------ setup

    def _build_model(self) -> None:
        recipe = self.recipe
        self.tokenizer = load_tokenizer(recipe.model.tokenizer)
        self.model = build_model(recipe.model, self.tokenizer)
        if recipe.stage.init_from:
            load_weights(self.model, model_files_dir(recipe.stage.init_from) / WEIGHTS)
        self.preset = apply_stage(self.model, recipe.stage)
        if recipe.model.gradient_checkpointing:
            self.model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.preset.vision:
                self.model.vision.encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        self.flops = StepFlops.for_model(self.model, self.preset)

    def _build_data(self) -> None:
        data, d = self.recipe.data, self.dist
        encoder = pipeline.make_encoder(data, self.tokenizer, self.model)
        collate_fn = pipeline.make_collate(self.tokenizer, self.model)
        mb = self.cfg.micro_batch_size
        self.loader = pipeline.train_loader(data, encoder, collate_fn, mb, self.cfg.seed, d.rank, d.world_size)
        self.eval_loader = pipeline.eval_loader(data, encoder, collate_fn, mb, d.rank, d.world_size)
        self.train_iter = None

    def _build_engine(self) -> None:
        groups = param_groups(self.model.parts(), self.recipe)
        optimizer, schedule = build_optimizer(groups, self.recipe)
        ds_config = build_ds_config(self.cfg, self.dist.world_size)
        module = ObjectiveModule(self.model, OBJECTIVES[self.recipe.stage.objective])
        if self.cfg.zero_stage == 3:
            # Losses read the LM head's weight directly (chunked, supervised positions only), outside
            # the head's own forward: ZeRO-3 must gather it for the objective module's forward/backward.
            from deepspeed.runtime.zero import register_external_parameter

            register_external_parameter(module, self.model.output_embeddings.weight)
        if self._autocast:
            ds_config["bf16"] = {"enabled": False}  # CPU bf16 runs under autocast instead, see _autocast
        self.engine = initialize_engine(module, optimizer, schedule, ds_config)
        bf16_weights = self.cfg.precision == "bf16" and not self._autocast
        self.input_dtype = torch.bfloat16 if bf16_weights else torch.float32
        self.compute_dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32

    # ------------------------------------------------------------------ loop

    def train(self) -> TrainResult:
        d = self.dist
        logger = MetricsLogger(
            self.output_dir,
            rank=d.rank,
            wandb_mode=self.cfg.wandb.mode,
            wandb_project=self.cfg.wandb.project,
            run_name=self.cfg.wandb.name,
            config=self.recipe.model_dump(mode="json"),
            total_steps=self.cfg.max_steps,
            progress_bar=self.cfg.progress_bar,
            initial_step=self.step,
        )
        if d.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(self.recipe.to_yaml())
        peak = measure_peak_flops(self.compute_dtype, device=str(d.device))
        self.train_iter = iter(self.loader)
        last_loss, eval_loss, saved = float("nan"), None, None
        while self.step < self.cfg.max_steps:
            metrics = self._train_step(peak)
            last_loss = metrics["loss"]
            self.step += 1
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.eval_loader is not None:
                metrics["eval_loss"] = eval_loss = self.evaluate()
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps:
                logger.log(self.step, metrics)
            if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                saved = self.save_checkpoint()
        if self.eval_loader is not None and not (self.cfg.eval_every and self.step % self.cfg.eval_every == 0):
            eval_loss = self.evaluate()
            logger.log(self.step, {"eval_loss": eval_loss})
        if saved is None or not saved.name.endswith(f"-{self.step}"):
            saved = self.save_checkpoint()
        logger.close()
        return TrainResult(step=self.step, last_loss=last_loss, eval_loss=eval_loss, checkpoint=saved)

    def _train_step(self, peak_flops: float) -> dict:
        """One optimizer step over `grad_accum` micro-batches, with the loss normalised by the
        supervised tokens of the whole global batch (all ranks, all micro-batches), so the
        result does not depend on how the global batch is split."""
        cfg, d = self.cfg, self.dist
        start = time.perf_counter()
        micro_batches = [next(self.train_iter) for _ in range(cfg.grad_accum)]
        data_time = time.perf_counter() - start
        local_tokens = sum(b.num_supervised_tokens for b in micro_batches)
        global_tokens = max(1, int(_all_reduce_sum(torch.tensor(float(local_tokens)))))
        scale = d.world_size * cfg.grad_accum / global_tokens  # undoes DeepSpeed's mean over ranks x micro-steps
        lr = self.engine.get_lr()[0]  # the rate this step uses (the schedule advances inside engine.step)
        loss_sum = torch.zeros(())
        aux_totals: dict[str, float] = {}
        for batch in micro_batches:
            batch = batch.to(d.device, dtype=self.input_dtype)
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                out: ObjectiveOutput = self.engine(batch)
            loss = out.loss_sum * scale + sum(out.aux_losses.values(), torch.zeros(()))
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += out.loss_sum.detach().float().cpu()
            for name, value in out.aux_losses.items():
                aux_totals[name] = aux_totals.get(name, 0.0) + float(value) / cfg.grad_accum
        step_time = time.perf_counter() - start
        tokens = sum(b.num_tokens for b in micro_batches)
        samples = sum(b.input_ids.shape[0] for b in micro_batches)
        images = sum(0 if b.pixel_values is None else b.pixel_values.shape[0] for b in micro_batches)
        self.tokens_seen += int(_all_reduce_sum(torch.tensor(float(tokens))))
        self.samples_seen += int(_all_reduce_sum(torch.tensor(float(samples))))
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "loss": float(_all_reduce_sum(loss_sum)) / global_tokens,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens * d.world_size / step_time,
            "samples_per_s": samples * d.world_size / step_time,
            "supervised_tokens": global_tokens,
            "step_time_s": step_time,
            "data_time_s": data_time,
            "peak_memory_gb": peak_memory_bytes() / 2**30,
            **{f"aux/{k}": v for k, v in aux_totals.items()},
        }
        flops_lm = sum(self.flops.lm(b.num_tokens, b.input_ids.shape[1]) for b in micro_batches)
        flops_vision = self.flops.vision(images)
        metrics["mfu"] = (flops_lm + flops_vision) / step_time / peak_flops
        metrics["mfu_lm_only"] = flops_lm / step_time / peak_flops
        skipped = skipped_counts(self.loader)
        if skipped:
            metrics.update({f"data/skipped/{k}": v for k, v in skipped.items()})
        return metrics

    @property
    def _autocast(self) -> bool:
        # DeepSpeed's bf16 mode casts weights on GPUs; on the CPU we run bf16 matmuls under
        # autocast with fp32 master weights, which this CPU's AMX executes several times faster.
        return self.cfg.precision == "bf16" and self.dist.device.type == "cpu"

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted held-out loss on the training model. Every rank runs the same number
        of forwards (a rank that ran out repeats a batch with zero weight) so ZeRO-3 never hangs."""
        self.engine.eval()
        total, count = torch.zeros(()), torch.zeros(())
        seen, limit = 0, self.recipe.data.max_eval_samples
        iterator, last = iter(self.eval_loader), None
        while True:
            batch = next(iterator, None)
            if batch is not None and limit is not None and seen >= limit:
                batch = None
            if _all_reduce_sum(torch.tensor(float(batch is not None))) == 0:
                break
            weight = 1.0 if batch is not None else 0.0
            batch = batch if batch is not None else last
            last = batch
            if batch is None:  # this rank never had an eval batch: nothing to repeat
                raise RuntimeError("a rank received no eval sample; use more eval shards or fewer ranks")
            seen += batch.input_ids.shape[0]
            with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                out = self.engine(batch.to(self.dist.device, dtype=self.input_dtype))
            total += weight * out.loss_sum.float().cpu()
            count += weight * out.num_tokens
        self.engine.train()
        return float(_all_reduce_sum(total) / _all_reduce_sum(count).clamp(min=1))

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        d = self.dist
        if d.is_main:
            tmp = ckpt.begin_save(self.ckpt_root, self.step)
        dist.barrier()
        tmp = self.ckpt_root / f".step-{self.step}.partial"  # the folder begin_save made on rank 0
        self.engine.save_checkpoint(str(tmp), tag="deepspeed")
        torch.save(
            {"loader": self.loader.state_dict(), "rng": ckpt.capture_rng_state()},
            tmp / f"rank{d.rank:05d}_state.pt",
        )
        lora = self.recipe.stage.lora if self.preset.lora else None
        connector = self.recipe.model.connector.model_dump()
        save_model_files(self.model, self.tokenizer, tmp / "model", d.rank, lora, connector)
        dist.barrier()
        final = self.ckpt_root / f"step-{self.step}"
        if d.is_main:
            (tmp / "recipe.yaml").write_text(self.recipe.to_yaml())
            manifest = ckpt.build_manifest(
                self.step, self.tokens_seen, self.samples_seen, self.recipe.model_dump(mode="json")
            )
            manifest["world_size"] = d.world_size
            final = ckpt.commit_save(tmp, manifest)
            ckpt.prune_checkpoints(self.ckpt_root, self.cfg.keep_last)
        dist.barrier()
        return final

    def _resume(self, path: Path) -> None:
        manifest = ckpt.read_manifest(path)
        if manifest.get("world_size", self.dist.world_size) != self.dist.world_size:
            raise RuntimeError(
                f"{path} was written by {manifest['world_size']} ranks but this run has {self.dist.world_size}; "
                "resume with the same number of ranks"
            )
        self.engine.load_checkpoint(str(path), tag="deepspeed")
        state = torch.load(path / f"rank{self.dist.rank:05d}_state.pt", weights_only=False)
        self.loader.load_state_dict(state["loader"])
        ckpt.restore_rng_state(state["rng"])
        self.step = manifest["step"]
        self.tokens_seen = manifest.get("tokens_seen", 0)
        self.samples_seen = manifest.get("samples_seen", 0)
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    value = value.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value


def train(recipe: Recipe) -> TrainResult:
    return Trainer(recipe).train()
