#!/usr/bin/env bash
# Every GPU benchmark in one go, for a lent CUDA machine (never needed by CI):
#   bash benchmarks/gpu_all.sh               # ~6-9 minutes on one H100; prints one table at the end
#   bash benchmarks/gpu_all.sh --dry-run     # CPU smoke: tiny preset, no DeepSpeed, a few seconds per part
# If .whl/ holds wheels (the project's dependencies, carried to a machine without network), they are
# installed into /tmp/site first, without touching the preinstalled torch. See benchmarks/gpu_all.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# transformers (5.2x) swaps in kernels from the Hugging Face Hub on CUDA by default; a machine without
# the Hub then fails loading any model, so the benchmarks run on transformers' own layers.
export USE_HUB_KERNELS="${USE_HUB_KERNELS:-0}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "${PYTHON:-python3}" benchmarks/gpu_all.py "$@"
