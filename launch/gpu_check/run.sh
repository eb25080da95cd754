#!/usr/bin/env bash
# The GPU check in one call, within 8 minutes (docs/performance.md, "GPU check"). From the repository root:
#
#   bash launch/gpu_check/run.sh               # on the GPU machine, with .whl/ from gather_wheels.sh carried
#   bash launch/gpu_check/run.sh --cpu --tiny  # on a CPU: the same parts, tiny shapes, CUDA tests skipped
#
# Installs the carried wheels into /tmp/site (the machine reaches no package index), then runs check.py:
# environment, CUDA-only tests, llava_train vs HF benchmark. Prints a table; writes gpu_check.json, the
# benchmark's JSON and the logs to $OUT (runs/gpu_check when unset).
set -uo pipefail
started=$(date +%s)
budget=480
cd "$(dirname "$0")/../.."
export OUT=${OUT:-runs/gpu_check} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
python=${PYTHON:-python3}

if [[ " $* " == *" --cpu "* ]]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  compgen -G ".whl/*.whl" >/dev/null || {
    echo "no wheels in .whl/: run 'bash launch/gpu_check/gather_wheels.sh' where pip works, and carry .whl" >&2
    exit 2
  }
  "$python" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
left=$((budget - ($(date +%s) - started)))
# check.py keeps its parts inside the budget (less 10 s for its report); the timeout is the backstop.
exec timeout -k 10 "$left" "$python" launch/gpu_check/check.py --started "$started" --budget $((budget - 10)) "$@"
