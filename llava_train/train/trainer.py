"""The training loop: one loop over a DeepSpeed engine, from one CPU process to many GPUs."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llava_train.data import pipeline
from llava_train.data.batch import TokenRole
from llava_train.evaluate import in_loop
from llava_train.model.build import apply_stage, build_model, load_tokenizer
from llava_train.model.stages import resolve_stage
from llava_train.model.io import initialise_from, save_model_files
from llava_train.model.context import RunState
from llava_train.model.mllm import MultimodalLM
from llava_train.model.zero3 import cast_unpartitioned, leaf_module_classes, mark_zero3_leaf_modules
from llava_train.modules.attach import attach_modules, describe, release_module_parameters
from llava_train.objectives import BuildContext, ObjectiveOutput, build_objective, objective_class
from llava_train.recipe import Recipe
from llava_train.train import checkpoint as ckpt
from llava_train.train.ds_config import build_ds_config
from llava_train.train.faults import NonFiniteGuard, any_rank, suppressed_update, zero_loss
from llava_train.train.engine import (
    DistInfo,
    build_optimizer,
    initialize_engine,
    param_groups,
    setup_distributed,
)
from llava_train.train.flops import StepFlops
from llava_train.train.memory import model_state_bytes
from llava_train.train.timing import PhaseTimer
from llava_train.train.metrics import MetricsLogger, measure_peak_flops, peak_memory_bytes, require_tensorboard
from llava_train.train.preemption import EXIT_PREEMPTED, StopSignal
from llava_train.train.resume_check import check_model_shapes, check_resumable

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

    def forward(self, batch) -> dict:
        # A plain dict, not the dataclass: ZeRO-3 finds the output tensors (to hook the backward
        # that re-gathers partitioned weights) only inside tuples, lists and dicts.
        return dict(vars(self.objective(self.model, batch)))


@dataclass
class TrainResult:
    step: int
    last_loss: float
    eval_loss: float | None
    checkpoint: Path | None
    preempted: bool = False  # stopped early on SIGUSR1/SIGTERM after saving `checkpoint`


class Trainer:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.cfg = recipe.train
        pipeline.check_data_paths(recipe.data)
        if self.cfg.tensorboard:
            require_tensorboard()
        # Held-out questions for the generation eval, checked before any model is built.
        generation_records = in_loop.read_checked_records(recipe) if self.cfg.eval_generate_every else None
        self.resume_from = ckpt.resolve_resume(self.cfg.output_dir, self.cfg.resume)
        self.dist: DistInfo = setup_distributed()
        if self.resume_from is not None:  # a damaged or foreign checkpoint is refused before any building
            check_resumable(self.resume_from, recipe, self.dist.world_size)
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank
        self.output_dir = Path(self.cfg.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.nonfinite = NonFiniteGuard(self.cfg.max_bad_steps, self.ckpt_root, self.dist.device, self.dist.rank)
        self._build_model()
        if self.resume_from is not None:
            check_model_shapes(self.resume_from, self.model)
        self._build_data()
        self._build_engine()
        self.generation_eval = None
        if generation_records is not None:
            d = self.dist
            self.generation_eval = in_loop.GenerationEval(
                recipe, generation_records, self.tokenizer, self.model, d.rank, d.world_size, d.device, self._autocast
            )
        self.step = 0
        self.tokens_seen = 0
        self.samples_seen = 0
        if self.resume_from is not None:
            self._resume(self.resume_from)

    # ------------------------------------------------------------------ setup

    def _build_model(self) -> None:
        recipe = self.recipe
        self.tokenizer = load_tokenizer(recipe.model.tokenizer)
        # The engine's own config: zero.Init must create partitions in the dtype the engine trains in.
        zero3_config = self._ds_config() if self.cfg.zero_stage == 3 else None
        self.model = build_model(recipe.model, self.tokenizer, zero3_config, seed=self.cfg.seed)
        if recipe.stage.init_from:
            lora = recipe.stage.lora if resolve_stage(recipe.stage).lora else None
            message = initialise_from(self.model, recipe.stage.init_from, lora, recipe.modules)
            if self.dist.is_main:
                log.info(message)
        attached = {module.name for module in self.model.attachments}  # carried over from init_from
        attach_modules(self.model, [spec for spec in recipe.modules if spec["type"] not in attached])
        self.preset = apply_stage(self.model, recipe.stage)
        release_module_parameters(self.model)  # modules train while the part they sit in is frozen
        if self.dist.is_main:
            for line in describe(self.model):
                log.info(line)
        if recipe.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing(vision=self.preset.vision)
        self.flops = StepFlops.for_model(self.model)  # after apply_stage: counts what trains
        self.timer = PhaseTimer(synchronize=self.recipe.train.sync_timing)
        self.timer.time_module(self.model.vision, "vision")

    def _build_data(self) -> None:
        data, d = self.recipe.data, self.dist
        # Grouped samples (preference pairs) are for objectives that declare they read them.
        reads_groups = objective_class(self.recipe.stage.objective["type"]).accepts_groups
        encoder = pipeline.make_encoder(
            data, self.tokenizer, self.model, self.recipe.model.vision.path, accept_groups=reads_groups
        )
        self.image_processor = encoder.image_processor  # saved with each checkpoint's model files
        collate_fn = pipeline.make_collate(self.tokenizer, self.model)
        mb, seed, accum = self.cfg.micro_batch_size, self.cfg.seed, self.cfg.grad_accum
        self.loader = pipeline.train_loader(data, encoder, collate_fn, mb, seed, d.rank, d.world_size, accum)
        self.eval_loader = pipeline.eval_loader(data, encoder, collate_fn, mb, d.rank, d.world_size)
        self.train_iter = None

    def _build_engine(self) -> None:
        groups = param_groups(self.model, self.recipe)
        optimizer, schedule = build_optimizer(groups, self.recipe)
        ds_config = self._ds_config()
        zero3_config = ds_config if self.cfg.zero_stage == 3 else None
        bf16_weights = self.cfg.precision == "bf16" and not self._autocast
        weights_dtype = torch.bfloat16 if bf16_weights else torch.float32
        build = BuildContext(self.recipe, self.tokenizer, self.model, zero3_config, self.dist.device, weights_dtype)
        self.objective = build_objective(self.recipe.stage.objective, build)
        module = ObjectiveModule(self.model, self.objective)
        if self.cfg.zero_stage == 3:
            # Losses read LM heads' weights directly (chunked, supervised positions only), outside the
            # heads' own forward: ZeRO-3 must gather them for the objective module's forward/backward.
            from deepspeed.runtime.zero import register_external_parameter

            for param in self.objective.external_parameters(self.model):
                register_external_parameter(module, param)
        if self.cfg.zero_stage == 3:
            # Data-dependent modules (experts) are gathered whole: the opted-in classes and the leaf
            # classes that attached modules declare.
            declared = [leaf for m in self.model.attachments for leaf in m.zero3_leaf_classes]
            mark_zero3_leaf_modules(module, list(dict.fromkeys(leaf_module_classes(module) + declared)))
            if ds_config["bf16"]["enabled"]:
                cast_unpartitioned(module, torch.bfloat16)  # the connector (and modules) join the bf16 partitions
        self.engine = initialize_engine(module, optimizer, schedule, ds_config)
        self.optimizer = optimizer  # what DeepSpeed steps at each boundary, under every ZeRO stage
        self.input_dtype = weights_dtype
        self.compute_dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32

    # ------------------------------------------------------------------ loop

    def train(self, save_final: bool = True) -> TrainResult:
        # SIGUSR1/SIGTERM only set a flag while the loop runs; outside it they act as usual.
        with StopSignal() as self.stop:
            return self._train(save_final)

    def _train(self, save_final: bool) -> TrainResult:
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
            tensorboard=self.cfg.tensorboard,
        )
        if d.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(self.recipe.to_yaml())
        peak = measure_peak_flops(self.compute_dtype, device=str(d.device))
        self.train_iter = iter(self.loader)
        self.step_logged_memory = False
        last_loss, eval_loss, saved = float("nan"), None, None
        while self.step < self.cfg.max_steps:
            if self.stop.agreed(d.device):  # a collective on every rank each step: all stop after the same step
                logger.close()
                return self._stop_early(saved, last_loss)
            metrics = self._train_step(peak)
            last_loss = metrics["loss"]
            self.step += 1
            if not self.step_logged_memory:
                # Optimizer states exist only after the first step; ZeRO's savings show here.
                metrics.update({f"model_state_gb/{k}": v / 2**30 for k, v in model_state_bytes(self.engine).items()})
                self.step_logged_memory = True
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.eval_loader is not None:
                metrics["eval_loss"] = eval_loss = self.evaluate()
            if self.generation_eval is not None and self._generation_due():
                metrics.update(self.evaluate_generation())
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps:
                logger.log(self.step, metrics)
            if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                saved = self.save_checkpoint()
        if self.eval_loader is not None and not (self.cfg.eval_every and self.step % self.cfg.eval_every == 0):
            eval_loss = self.evaluate()
            logger.log(self.step, {"eval_loss": eval_loss})
        if save_final and (saved is None or not saved.name.endswith(f"-{self.step}")):
            saved = self.save_checkpoint()
        logger.close()
        return TrainResult(step=self.step, last_loss=last_loss, eval_loss=eval_loss, checkpoint=saved)

    def _stop_early(self, saved: Path | None, last_loss: float) -> TrainResult:
        """A stop signal arrived: checkpoint the last finished step (unless that checkpoint exists:
        just saved, or resumed from) and report preemption; no final evaluation, time is short."""
        start = time.perf_counter()
        here = self.ckpt_root / f"step-{self.step}"
        if here not in (saved, self.resume_from):
            saved = self.save_checkpoint()
        if self.dist.is_main:
            received = self.stop.received.name if self.stop.received else "a stop signal on another rank"
            log.warning("%s: stopping after step %d; checkpoint %s (%.1f s); exit code %d asks for a requeue",
                        received, self.step, here, time.perf_counter() - start, EXIT_PREEMPTED)
        return TrainResult(step=self.step, last_loss=last_loss, eval_loss=None, checkpoint=here, preempted=True)

    def _train_step(self, peak_flops: float) -> dict:
        """One optimizer step over `grad_accum` micro-batches, with the loss normalised by the
        supervised tokens of the whole global batch (all ranks, all micro-batches), so the
        result does not depend on how the global batch is split."""
        cfg, d = self.cfg, self.dist
        start = time.perf_counter()
        micro_batches = [next(self.train_iter) for _ in range(cfg.grad_accum)]
        data_time = time.perf_counter() - start
        visual = _visual_metrics(micro_batches)  # refuses a step whose micro-batches disagree on the budget
        self.timer.pop()  # drop anything timed outside the step (evaluation, for one)
        local = [sum(self.objective.count(b) for b in micro_batches), sum(b.num_supervised_tokens for b in micro_batches)]
        units, supervised = (int(n) for n in _all_reduce_sum(torch.tensor(local, dtype=torch.float64)))
        global_units = max(1, units)  # the objective's normaliser: supervised tokens, sequences or pairs
        scale = d.world_size * cfg.grad_accum / global_units  # undoes DeepSpeed's mean over ranks x micro-steps
        lr = self.engine.get_lr()[0]  # the rate this step uses (the schedule advances inside engine.step)
        loss_sum = torch.zeros(())
        aux_totals: dict[str, float] = {}
        objective_metrics: dict[str, float] = {}
        skip = False  # a non-finite loss on any rank skips the whole step's update (see faults.py)
        for micro_step, batch in enumerate(micro_batches):
            batch = batch.to(d.device, dtype=self.input_dtype)
            self.model.run_state = RunState(cfg.seed, self.step, micro_step, d.rank)  # keys per-step draws
            with self.timer.phase("forward"), torch.autocast(d.device.type, torch.bfloat16, enabled=self._autocast):
                out = ObjectiveOutput(**self.engine(batch))
            loss = out.loss_sum * scale + sum(out.aux_losses.values(), torch.zeros(()))
            skip = skip or self.nonfinite.is_bad(loss, self.step + 1)
            with self.timer.phase("backward"):
                self.engine.backward(zero_loss(loss) if skip else loss)
            if micro_step == len(micro_batches) - 1 and self.cfg.zero_stage == 0:
                unclipped_norm = _grad_norm(self.optimizer)  # DeepSpeed reports none without ZeRO in fp32
            with self.timer.phase("optimizer"), suppressed_update(self.engine, self.optimizer, skip):
                self.engine.step()
            loss_sum += out.loss_sum.detach().float().cpu()
            for name, value in out.aux_losses.items():
                aux_totals[name] = aux_totals.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
            for name, value in out.metrics.items():  # objective/module metrics, averaged over micro-batches
                objective_metrics[name] = objective_metrics.get(name, 0.0) + float(value) / cfg.grad_accum
        step_time = time.perf_counter() - start
        self.nonfinite.end_step(self.step + 1, skip)  # raises after train.max_bad_steps in a row
        tokens = sum(b.num_tokens for b in micro_batches)
        samples = sum(b.num_samples for b in micro_batches)  # rows hold several samples when packed
        images = sum(0 if b.pixel_values is None else b.pixel_values.shape[0] for b in micro_batches)
        self.tokens_seen += int(_all_reduce_sum(torch.tensor(float(tokens))))
        self.samples_seen += int(_all_reduce_sum(torch.tensor(float(samples))))
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None and self.cfg.zero_stage == 0:
            grad_norm = unclipped_norm
        metrics = {
            "loss": float(_all_reduce_sum(loss_sum)) / global_units,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens * d.world_size / step_time,
            "samples_per_s": samples * d.world_size / step_time,
            "supervised_tokens": supervised,
            f"normaliser/{self.objective.normaliser}": global_units,
            "step_time_s": step_time,
            "data_time_s": data_time,
            "peak_memory_gb": peak_memory_bytes() / 2**30,
            "padding_fraction": 1 - tokens / sum(b.input_ids.numel() for b in micro_batches),
            "nonfinite_skipped": self.nonfinite.skipped_total,
            **self.timer.pop(),
            **visual,
            **_mean_over_ranks({f"aux/{k}": v for k, v in aux_totals.items()}),
            **_mean_over_ranks({f"objective/{k}": v for k, v in objective_metrics.items()}),
        }
        flops_lm = sum(self.flops.for_batch(b) for b in micro_batches)
        flops_vision = self.flops.vision(images)
        metrics["mfu"] = (flops_lm + flops_vision) / step_time / peak_flops
        metrics["mfu_lm_only"] = flops_lm / step_time / peak_flops
        metrics.update(pipeline.loader_metrics(self.loader))  # data/skipped/<reason>, data/source/<name>
        return metrics

    def _ds_config(self) -> dict:
        config = build_ds_config(self.cfg, self.dist.world_size)
        if self._autocast:
            config["bf16"] = {"enabled": False}  # CPU bf16 runs under autocast instead, see _autocast
        return config

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
            seen += batch.num_samples
            with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                out = ObjectiveOutput(**self.engine(batch.to(self.dist.device, dtype=self.input_dtype)))
            total += weight * out.loss_sum.float().cpu()
            count += weight * out.count
        self.engine.train()
        return float(_all_reduce_sum(total) / _all_reduce_sum(count).clamp(min=1))

    def _generation_due(self) -> bool:
        return self.step % self.cfg.eval_generate_every == 0 or self.step == self.cfg.max_steps

    @torch.no_grad()
    def evaluate_generation(self) -> dict[str, float]:
        """Greedy answers to held-out questions on the training model (all ranks in lockstep)."""
        self.engine.eval()
        try:
            return self.generation_eval(self.step)
        finally:
            self.engine.train()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        d = self.dist
        numel = [getattr(p, "ds_numel", p.numel()) for p in self.model.parameters()]
        trainable = sum(n for n, p in zip(numel, self.model.parameters()) if p.requires_grad)
        space = ckpt.expected_bytes(self.ckpt_root, fallback=ckpt.estimate_from_params(sum(numel), trainable))
        tmp = self.ckpt_root / f".step-{self.step}.partial"  # made by rank 0, written by every rank
        with self._all_ranks_or_none(tmp, space):  # each phase ends in a collective (also a barrier)
            if d.is_main:
                ckpt.require_free_space(self.ckpt_root, space[0])
                ckpt.begin_save(self.ckpt_root, self.step)
        with self._all_ranks_or_none(tmp, space):
            self.engine.save_checkpoint(str(tmp), tag="deepspeed")
            torch.save(
                {"loader": self.loader.state_dict(), "rng": ckpt.capture_rng_state()},
                tmp / f"rank{d.rank:05d}_state.pt",
            )
            lora = self.recipe.stage.lora if self.preset.lora else None
            connector = self.recipe.model.connector.model_dump()
            data = self.recipe.data
            save_model_files(
                self.model, self.tokenizer, tmp / "model", d.rank, lora, connector, data.template, data.system_prompt
            )
            if d.is_main:  # the image settings training used, for generate and export (model/prompting.py)
                self.image_processor.save_pretrained(tmp / "model" / "vision")
        final = self.ckpt_root / f"step-{self.step}"
        with self._all_ranks_or_none(tmp, space):
            if d.is_main:
                (tmp / "recipe.yaml").write_text(self.recipe.to_yaml())
                manifest = ckpt.build_manifest(
                    self.step, self.tokens_seen, self.samples_seen, self.recipe.model_dump(mode="json")
                )
                manifest["world_size"] = d.world_size
                final = ckpt.commit_save(tmp, manifest)
        if d.is_main:
            ckpt.prune_checkpoints(self.ckpt_root, self.cfg.keep_last)
        dist.barrier()
        return final

    @contextlib.contextmanager
    def _all_ranks_or_none(self, tmp: Path, space: tuple[int, str]):
        """Run this rank's part of a save, then learn (a collective) whether any rank ran out of
        disk space. If one did, every rank raises DiskFullError, rather than the others waiting
        at the next barrier, and rank 0 removes the partial folder: older checkpoints stay as
        they were. (A rank failing alone inside DeepSpeed's own save, which ends in a barrier,
        still leaves the others waiting there; the free-space check up front makes that rare.)"""
        error = None
        try:
            yield
        except OSError as exc:
            if not ckpt.is_out_of_space(exc):
                raise
            error = exc
        if any_rank(error is not None, self.dist.device):
            if self.dist.is_main:
                ckpt.discard_partial(tmp)
            message = ckpt.disk_full_message(self.ckpt_root, self.step, *space, cause=error)
            raise ckpt.DiskFullError(message) from error

    def _resume(self, path: Path) -> None:
        manifest = ckpt.read_manifest(path)  # validated in __init__ (check_resumable)
        self.engine.load_checkpoint(str(path), tag="deepspeed")
        state = torch.load(path / f"rank{self.dist.rank:05d}_state.pt", weights_only=False)
        self.loader.load_state_dict(state["loader"])
        ckpt.restore_rng_state(state["rng"])
        self.step = manifest["step"]
        self.tokens_seen = manifest.get("tokens_seen", 0)
        self.samples_seen = manifest.get("samples_seen", 0)
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)


def _visual_metrics(micro_batches: list) -> dict[str, float]:
    """The step's visual budget (when the connector's count varies) and this rank's image tokens. The loader plans
    every micro-batch for the budget of the step it expects it in, so they must agree."""
    budgets = {b.visual_budget for b in micro_batches}
    if len(budgets) > 1:
        raise RuntimeError(
            f"the micro-batches of one step carry visual budgets {sorted(budgets)}: the data loader and the "
            "trainer disagree on step boundaries (was the loader built with this run's train.grad_accum?)"
        )
    image_tokens = sum(int((b.token_roles == int(TokenRole.IMAGE)).sum()) for b in micro_batches)
    budget = budgets.pop()
    return {"visual_tokens": image_tokens, **({"visual_budget": budget} if budget is not None else {})}


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks; NCCL only reduces GPU tensors, so it travels there and back."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value.clone()
    on_gpu = dist.get_backend() == "nccl"
    reduced = value.to(f"cuda:{torch.cuda.current_device()}") if on_gpu else value.clone()
    dist.all_reduce(reduced)
    return reduced.cpu()


def _grad_norm(optimizer) -> float:
    """The global L2 norm of the gradients the optimizer is about to apply, before clipping. Without ZeRO,
    DeepSpeed all-reduces the gradients in the boundary's backward, so every rank holds the same ones."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each name's mean over the ranks that reported it (ranks may report different names, e.g. a
    module metric only where images were seen); a collective: every rank calls it every step."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(metrics)
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, metrics)
    names = sorted({name for reported in gathered for name in reported})
    return {n: sum(r[n] for r in gathered if n in r) / sum(n in r for r in gathered) for n in names}


def train(recipe: Recipe) -> TrainResult:
    return Trainer(recipe).train()
