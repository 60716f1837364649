#!/usr/bin/env bash
# Developer build of fastlm._C in place, safe to run while other processes use the library:
# serialized with a lock, built out of tree, then renamed into fastlm/ (an atomic replace, so a
# running process keeps its mapped copy). FASTLM_BUILD_CUDA=0 builds the CPU kernels only (seconds);
# the default also compiles and links the CUDA sources (minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-2}"
PY="${PYTHON:-.venv/bin/python}"
exec 9>build/.dev_build.lock 2>/dev/null || { mkdir -p build; exec 9>build/.dev_build.lock; }
flock 9
tag=$([ "${FASTLM_BUILD_CUDA:-1}" = "0" ] && echo cpu || echo cuda)
"$PY" setup.py -q build_ext --build-lib "build/dev-$tag" --build-temp "build/tmp-$tag"
so=$(ls build/dev-$tag/fastlm/_C*.so)
cp "$so" "fastlm/.$(basename "$so").tmp"
mv -f "fastlm/.$(basename "$so").tmp" "fastlm/$(basename "$so")"
echo "dev_build: fastlm/$(basename "$so") ($tag)"
