#!/usr/bin/env bash
# Set up (with the test oracles) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
python -m pytest -q "$@"
