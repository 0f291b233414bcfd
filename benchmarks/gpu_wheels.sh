#!/usr/bin/env bash
# Downloads the wheels of benchmarks/gpu_wheels.txt into .whl/, for the lent GPU machine (x86-64,
# CPython 3.12, no network), where benchmarks/gpu_all.sh installs them. Run it on a machine that reaches
# the package registry, from any Python with pip (PYTHON, default python3):
#   bash benchmarks/gpu_wheels.sh
# A package published as source only (DeepSpeed) is built into a wheel here: a pure-Python one, its C++/CUDA
# ops compile where they are first used. .whl/ ignores itself (a .gitignore of its own), so it is never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
mkdir -p .whl
echo '*' > .whl/.gitignore
platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
grep -v '^\s*\(#\|$\)' benchmarks/gpu_wheels.txt | while read -r requirement; do
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${platform[@]}" -d .whl "$requirement" 2>/dev/null; then
    echo "$requirement: no wheel for the GPU machine on the registry; building one from its source" >&2
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps -w .whl "$requirement"
  fi
done
ls .whl/*.whl | wc -l | xargs echo "wheels in .whl/:"
du -sh .whl | cut -f1 | xargs echo "size:"
