#!/usr/bin/env bash
# The GPU run in one go, for a lent CUDA machine (never needed by CI): correctness on CUDA, then users'
# shapes against TRL (benchmarks/gpu_all.py):
#   bash benchmarks/gpu_all.sh               # under 9 minutes on one H100 or H200; prints one table at the end
#   bash benchmarks/gpu_all.sh --dry-run     # the same parts on CPU at a tiny size
# If .whl/ holds wheels (benchmarks/gpu_wheels.sh puts them there, for a machine without network), they
# are installed into /tmp/site first, without touching the preinstalled torch.
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
