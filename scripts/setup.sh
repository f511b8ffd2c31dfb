#!/usr/bin/env bash
# Set up fewstep in ./.venv. Usage: bash scripts/setup.sh [--test]   (--test adds the test oracles)
# torch is installed first and pinned, so nothing later can pull a different (CUDA) build on a CPU
# machine; set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch==2.11.0" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { echo "[$1/3] $2 ($((SECONDS - start)) s)"; }
extras=""; [ "${1:-}" = "--test" ] && extras="[test]"
step 1 "virtual environment in .venv"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PYTHONWARNINGS=ignore PIP_DISABLE_PIP_VERSION_CHECK=1  # pip and the build backend: errors only
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
step 2 "PyTorch ${TORCH_SPEC:-torch==2.13.0} (a minute on a fresh machine)"
python -m pip install -qq "${TORCH_SPEC:-torch==2.13.0}"
step 3 "fewstep${extras} and its dependencies"
python -m pip install -qq -e ".${extras}"
python - <<'PY'
import torch, fewstep
print(f"fewstep {fewstep.__version__} ready (torch {torch.__version__})")
PY
