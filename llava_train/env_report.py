"""`llava-train env` (alias `doctor`): what this machine and environment offer a run, and
which known-bad combinations it would hit.

`collect()` gathers facts (versions from package metadata, the accelerator, CPU flags, the
DeepSpeed ops, the launcher's environment); `problems(facts, recipe)` is a pure function of
them, so each rule is testable with made-up facts. Only cheap checks: nothing is compiled,
no process group is created.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

from llava_train.recipe import Recipe

MIN_DEEPSPEED = (0, 16)  # pyproject's lower bound; older releases lack APIs the engine uses
PACKAGES = ("torch", "deepspeed", "transformers", "peft", "webdataset", "torchdata", "triton", "flash-attn",
            "llava_train")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
DS_OPS = {"cpu_adam": "CPUAdamBuilder", "fused_adam": "FusedAdamBuilder", "async_io": "AsyncIOBuilder"}
WORLD_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_NNODES", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_GPUS_ON_NODE")


# ----------------------------------------------------------------------------- facts


def collect() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,  # None on a CPU build
        "gpus": _gpus(torch),
        "gpu_hardware": _gpu_hardware(),
        "cpu": _cpu(),
        "deepspeed_ops": _deepspeed_ops(),
        "env": {name: os.environ[name] for name in WORLD_ENV if name in os.environ},
        "world_size": int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))),
        "torchrun_forwards_signals": _torchrun_forwards_signals(),
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _gpus(torch) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16": props.major >= 8,  # Ampere and newer
        })
    return gpus


def _gpu_hardware() -> bool:
    """An NVIDIA GPU is attached, whatever torch thinks (to catch a CPU-only torch build)."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def _cpu() -> dict:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name":
                model = value.strip()
    except OSError:  # not Linux
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": os.cpu_count(), "usable_cores": usable,
            "flags": [flag for flag in CPU_FLAGS if flag in flags]}


def _deepspeed_ops() -> dict:
    """Per op: pre-built at install time, and whether this machine could JIT-build it. llava_train
    itself uses torch's AdamW, so none is required; they matter for your own DeepSpeed presets."""
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
    except Exception as exc:  # deepspeed missing or broken: reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    ops = {}
    for op, builder_name in DS_OPS.items():
        try:
            builder = get_accelerator().create_op_builder(builder_name)
            buildable = bool(builder is not None and builder.is_compatible(verbose=False))
        except Exception:
            buildable = False
        ops[op] = {"prebuilt": bool(installed_ops.get(op)), "buildable": buildable}
    return ops


def _torchrun_forwards_signals() -> bool:
    """torchrun can pass SIGUSR1 on to the ranks and give them time to checkpoint
    (`--signals-to-handle`, `--shutdown-timeout`), as launch/slurm/train.sbatch asks it to."""
    from torch.distributed.launcher.api import LaunchConfig

    return {"signals_to_handle", "shutdown_timeout"} <= set(LaunchConfig.__dataclass_fields__)


# ----------------------------------------------------------------------------- rules


def problems(facts: dict, recipe: Recipe | None = None) -> list[str]:
    """Known-bad combinations, each with what to do about it."""
    out = []
    versions = facts["versions"]
    gpus = facts["gpus"]
    ds = versions.get("deepspeed")
    if ds is not None and _release(ds) < MIN_DEEPSPEED:
        out.append(f"deepspeed {ds} is older than {'.'.join(map(str, MIN_DEEPSPEED))}, the oldest llava_train "
                   "supports: pip install -U deepspeed")
    if facts["torch_cuda"] and not gpus:
        visible = facts["env"].get("CUDA_VISIBLE_DEVICES", "unset")
        out.append(f"torch {versions['torch']} is a CUDA {facts['torch_cuda']} build but sees no GPU "
                   f"(CUDA_VISIBLE_DEVICES={visible}); runs would use the CPU and gloo. Check nvidia-smi and "
                   "CUDA_VISIBLE_DEVICES")
    if not facts["torch_cuda"] and facts["gpu_hardware"]:
        out.append(f"an NVIDIA GPU is present but torch {versions['torch']} is a CPU-only build; install the "
                   "torch build for your CUDA version (README: Quick start)")
    if not facts["torchrun_forwards_signals"]:
        out.append("this torch's torchrun has no --signals-to-handle/--shutdown-timeout, which launch/slurm/"
                   "train.sbatch passes so that SLURM's SIGUSR1 reaches the ranks: upgrade torch, or drop those "
                   "two options from the script and use `#SBATCH --signal=TERM@120` (torchrun forwards SIGTERM)")
    if facts["world_size"] > 1 and "MASTER_ADDR" not in facts["env"]:
        out.append(f"WORLD_SIZE={facts['world_size']} but MASTER_ADDR is not set: start multi-process runs "
                   "through torchrun, the deepspeed launcher or launch/slurm/train.sbatch")
    if recipe is not None:
        out += _recipe_problems(facts, recipe)
    return out


def _recipe_problems(facts: dict, recipe: Recipe) -> list[str]:
    out = []
    gpus = facts["gpus"]
    if recipe.model.attn_implementation == "flash_attention_2":
        if facts["versions"].get("flash-attn") is None:
            out.append("model.attn_implementation=flash_attention_2 but flash-attn is not installed: "
                       "pip install flash-attn (CUDA only), or set model.attn_implementation=sdpa")
        if not gpus:
            out.append("model.attn_implementation=flash_attention_2 needs a CUDA GPU and this machine has none "
                       "visible; set model.attn_implementation=sdpa")
    if recipe.train.precision == "bf16":
        no_bf16 = [f"GPU {i} ({g['name']}, compute capability {g['capability']})"
                   for i, g in enumerate(gpus) if not g["bf16"]]
        if no_bf16:
            out.append(f"train.precision=bf16 but {', '.join(no_bf16)} has no bf16 support (it needs 8.0 or "
                       "newer); set train.precision=fp32")
        if not gpus and not {"avx512_bf16", "amx_bf16"} & set(facts["cpu"]["flags"]):
            out.append("train.precision=bf16 on a CPU without AVX512-BF16 or AMX: bf16 matmuls are emulated "
                       "and slower than fp32; set train.precision=fp32")
    return out


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# ----------------------------------------------------------------------------- report


def render(facts: dict, found: list[str]) -> str:
    v = facts["versions"]
    lines = [f"python        {facts['python']}  ({facts['platform']})"]
    for name in PACKAGES:
        shown = v.get(name) or "not installed"
        if name == "torch" and v.get(name):
            shown += f"  (CUDA {facts['torch_cuda']})" if facts["torch_cuda"] else "  (CPU build)"
        lines.append(f"{name:<13} {shown}")
    cpu = facts["cpu"]
    lines.append(f"cpu           {cpu['model']}, {cpu['usable_cores']} of {cpu['cores']} cores usable, "
                 f"flags: {' '.join(cpu['flags']) or 'none of ' + ' '.join(CPU_FLAGS)}")
    if facts["gpus"]:
        for i, gpu in enumerate(facts["gpus"]):
            lines.append(f"gpu {i:<9} {gpu['name']}, capability {gpu['capability']}, {gpu['memory_gib']} GiB, "
                         f"bf16 {'yes' if gpu['bf16'] else 'no'}")
    else:
        lines.append("gpu           none visible: runs use the CPU (gloo)")
    ops = facts["deepspeed_ops"]
    if "error" in ops:
        lines.append(f"deepspeed ops unavailable: {ops['error']}")
    else:
        described = [f"{op} ({'pre-built' if o['prebuilt'] else 'JIT-buildable' if o['buildable'] else 'unavailable'})"
                     for op, o in ops.items()]
        lines.append(f"deepspeed ops {', '.join(described)}")
    lines.append(f"world size    {facts['world_size']}  "
                 + (" ".join(f"{k}={val}" for k, val in facts["env"].items()) or "(no launcher environment)"))
    lines.append(f"torchrun      {'forwards' if facts['torchrun_forwards_signals'] else 'cannot forward'} "
                 "SIGUSR1 to the ranks (--signals-to-handle)")
    lines.append("")
    lines += [f"WARNING: {p}" for p in found] or ["no known problems found"]
    return "\n".join(lines)


def run_env(recipe_path: str | None, overrides: list[str], as_json: bool) -> int:
    """The `llava-train env` command: 0 when no problem was found, 1 otherwise."""
    recipe = None
    if recipe_path is not None:
        from llava_train.recipe import RecipeError, load_recipe

        try:
            recipe = load_recipe(recipe_path, overrides)
        except RecipeError as exc:
            print(f"recipe error: {exc}", file=sys.stderr)
            return 2
    facts = collect()
    found = problems(facts, recipe)
    print(json.dumps({**facts, "warnings": found}, indent=2) if as_json else render(facts, found))
    return 1 if found else 0
