#!/usr/bin/env bash
# Make a venv with another supported stack (by default the GPU machine's: Python 3.12, torch 2.11,
# torchvision 0.26, triton 3.6, numpy 2.5), build the package into it and run the test suite there.
#
#   benchmarks/stack_check.sh                       # whole suite
#   benchmarks/stack_check.sh tests/test_fuse.py -k eval   # a selection (pytest arguments)
#
# Environment:
#   STACK_VENV   where the venv goes (default /work/stack312; outside the repository, so the
#                tests' subprocesses and pip never see it as part of the tree)
#   STACK_PYTHON the interpreter (default python3.12 from pyenv, else on PATH)
#   STACK_PINS   the pin file (default benchmarks/stack-torch2.11.txt)
#   STACK_REBUILD=0  keep the package already built into the venv (default: reinstall)
#
# The venv is reused between runs: torch and the test requirements install once; the package is
# reinstalled from the tree every run (pip builds in build/, so only changed C++ recompiles;
# STACK_REBUILD=0 skips it when the venv already has a build, to rerun tests quickly).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${STACK_VENV:-/work/stack312}
pins=${STACK_PINS:-$repo/benchmarks/stack-torch2.11.txt}
default_python=/root/.pyenv/versions/3.12.1/bin/python3.12
[ -x "$default_python" ] || default_python=$(command -v python3.12 || true)
python=${STACK_PYTHON:-$default_python}
if [ -z "$python" ] || [ ! -x "$python" ]; then
    echo "stack_check: no Python 3.12 found; set STACK_PYTHON" >&2
    exit 2
fi

# The pin file overrides requirements*.txt line by line: every package it names is dropped
# from the project's lists, the rest is kept as pinned there.
merged=$(mktemp)
trap 'rm -f "$merged"' EXIT
overridden=$(grep -Eo '^[A-Za-z0-9_.-]+' "$pins" | tr 'A-Z_' 'a-z-' | sort -u)
cat "$pins" > "$merged"
cat "$repo/requirements.txt" "$repo/requirements-test.txt" |
    grep -Ev '^\s*(#|-r|$)' |
    while read -r line; do
        name=$(echo "$line" | grep -Eo '^[A-Za-z0-9_.-]+' | tr 'A-Z_' 'a-z-')
        grep -qx "$name" <<<"$overridden" || echo "$line"
    done >> "$merged"

if [ ! -x "$venv/bin/python" ]; then
    echo "stack_check: creating $venv with $python"
    "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
# The machine's pip constraints may cap torch at the main stack's version; the pins here rule.
export PIP_CONSTRAINT=
if ! python -m pip install -q -r "$merged"; then
    echo "stack_check: installing the pinned stack failed" >&2
    exit 1
fi
python -m pip install -q --no-deps "$(grep -E '^nvidia-cutlass' "$repo/requirements-build.txt")"

built() { (cd / && python -c 'import fused_resnet._C') 2>/dev/null; }
if [ "${STACK_REBUILD:-1}" != 0 ] || ! built; then
    echo "stack_check: building fused_resnet (sm_90) into $venv"
    (cd "$repo" && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
        TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} &&
        python -m pip install -q --no-build-isolation --no-deps .)
fi

(cd / && python - <<'PY'
import sys, numpy, torch, torchvision, triton
print(f"stack_check: python {sys.version.split()[0]}, torch {torch.__version__} "
      f"(cuda {torch.version.cuda}), torchvision {torchvision.__version__}, "
      f"triton {triton.__version__}, numpy {numpy.__version__}")
PY
)
cd "$repo"
if [ $# -eq 0 ]; then
    set -- tests
fi
# `pytest`, not `python -m pytest`: the latter puts the repository root on sys.path, and the
# tests would import the source tree (without the built _C) instead of the installed package.
exec pytest -q -p no:cacheprovider "$@"
