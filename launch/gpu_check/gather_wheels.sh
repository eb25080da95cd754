#!/usr/bin/env bash
# Gathers into .whl/ the wheels that launch/gpu_check/run.sh installs on the device machine, which reaches
# no package index. Runs here: downloads the pins of launch/gpu_check/wheels.txt for CPython 3.12 on x86-64
# Linux, builds DeepSpeed into a wheel without its ops (none is used: torch's AdamW, no fused kernels), checks
# the set (wheels.py check), tries the install run.sh does, and prints the size that travels.
#
#   bash launch/gpu_check/gather_wheels.sh      # PY312=/path/to/python3.12 to also try imports under 3.12
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}  # needs torch installed: DeepSpeed's setup.py imports it
py312=${PY312:-python3.12}
dest=.whl
list=launch/gpu_check/wheels.txt
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for_the_machine=(--only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")

rm -rf "$dest" && mkdir -p "$dest"
mapfile -t pins < <(grep -v '^#' "$list" | grep -v '^deepspeed==' | grep .)
deepspeed=$(grep '^deepspeed==' "$list")
echo "downloading ${pins[*]}"
"$python" -m pip download --quiet --no-deps "${for_the_machine[@]}" -d "$dest" "${pins[@]}"
echo "building $deepspeed without ops"
# --no-build-isolation: setup.py imports torch, which is installed here (an isolated build would fetch one).
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-cache-dir --no-deps --no-build-isolation \
  --no-binary deepspeed -w "$dest" "$deepspeed"
"$python" launch/gpu_check/wheels.py check "$dest"

# The install run.sh does, into a fresh folder; then imports under Python 3.12 where one is here. Only the
# packages whose needs a bare 3.12 can meet are imported (pydantic, with typing-extensions, which the machine
# has, fetched for this trial only); deepspeed, torchdata and webdataset need torch or numpy there.
trial=$(mktemp -d)
trap 'rm -rf "$trial"' EXIT
if "$py312" -c '' 2>/dev/null; then
  "$py312" -m pip install --quiet --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --target "$trial/site" "$dest"/*.whl
  "$py312" -m pip download --quiet --no-deps "${for_the_machine[@]}" -d "$trial/extra" typing-extensions
  "$py312" -m pip install --quiet --root-user-action=ignore --no-index --no-deps --target "$trial/site" "$trial/extra"/*.whl
  PYTHONPATH="$trial/site" "$py312" -c 'import pydantic, pydantic_core, hjson, braceexpand, sys
print("python", sys.version.split()[0], "imports pydantic", pydantic.VERSION, "(core", pydantic_core.__version__ + "), hjson, braceexpand")'
  ls "$trial/site" | grep -qx deepspeed && ls "$trial/site" | grep -qx torchdata && ls "$trial/site" | grep -qx webdataset
  echo "installed all $(ls "$dest" | wc -l) wheels into a fresh --target with --no-index --no-deps"
else
  echo "no $py312 here: wheel tags checked (wheels.py), no trial install (pip refuses cp312 wheels on another Python)"
fi

wheels_mib=$(du -sm "$dest" | cut -f1)
repo_mib=$(git ls-files -z --cached --others --exclude-standard | du -cm --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "$dest: $(ls "$dest" | wc -l) wheels, ${wheels_mib} MiB; with the working tree (${repo_mib} MiB) about" \
     "$((wheels_mib + repo_mib)) MiB of the device's 64 MiB limit"
