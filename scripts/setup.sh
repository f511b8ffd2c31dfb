#!/usr/bin/env bash
# Set up fewstep in ./.venv. Usage: bash scripts/setup.sh [--test]   (--test adds the test oracles)
# torch is installed first and pinned, so nothing later can pull a different (CUDA) build on a CPU
# machine; set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch==2.11.0" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
quiet() { "$@" 2>&1 | grep -v -E "is ignored: it is neither|^\s*$|!!|wheel_obj|\*\*\*|#+$|Please |easily used|See http|this is not|to be available|setuptools|deprecat|^\s+\S+$" || true; }
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
quiet python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
extras=""; [ "${1:-}" = "--test" ] && extras="[test]"
quiet python -m pip install -q -e ".${extras}"
python - <<'PY'
import torch, fewstep
print(f"fewstep {fewstep.__version__} ready (torch {torch.__version__})")
PY
