#!/usr/bin/env bash
# Syntax-checks fastlm's C++ CPU sources (csrc/ops.cpp, csrc/cpu/*.cpp) for aarch64 with the cross
# compiler (Debian: g++-aarch64-linux-gnu), against the installed (x86) torch's headers, as setup.py
# would compile them there (no -mavx2: x86 flags, intrinsics and target attributes must sit behind x86
# guards, with portable fallbacks). Fails on the first file with an error. -fsyntax-only also
# instantiates templates, so most type errors of the non-x86 branches show up.
# Usage: scripts/check_aarch64.sh [compiler]   (default aarch64-linux-gnu-g++; PYTHON picks the python)
set -euo pipefail
cd "$(dirname "$0")/.."
CXX_A64="${1:-aarch64-linux-gnu-g++}"
PY="${PYTHON:-python}"
command -v "$CXX_A64" >/dev/null || { echo "check_aarch64: $CXX_A64 not found (apt-get install g++-aarch64-linux-gnu)" >&2; exit 2; }
read -r TORCH_INC PY_INC < <("$PY" - <<'PYEOF'
import os, sysconfig, torch
print(os.path.join(os.path.dirname(torch.__file__), "include"), sysconfig.get_paths()["include"])
PYEOF
)
# The x86 torch headers and Python's pyconfig.h are arch-neutral enough for a syntax check;
# torch's own aarch64 build defines the same macros as its x86 one here (no CPU_CAPABILITY: at::vec's
# generic or NEON code).
flags=(-std=c++20 -fsyntax-only -fopenmp -O2 -Wall -Wno-unknown-pragmas -Werror=return-type
       -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
       -Icsrc -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$PY_INC")
# Two files at a time (CI has 2 cores); each file's errors go to its own log, printed after.
logdir=$(mktemp -d); trap 'rm -rf "$logdir"' EXIT
check() { "$CXX_A64" "${flags[@]}" "$1" 2>"$logdir/$(basename "$1").log"; echo $? >"$logdir/$(basename "$1").rc"; }
files=(csrc/ops.cpp csrc/cpu/*.cpp)
for f in "${files[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do wait -n || true; done
  check "$f" &
done
wait
status=0
for f in "${files[@]}"; do
  b=$(basename "$f")
  if [ "$(cat "$logdir/$b.rc")" = 0 ]; then
    echo "ok    $f"
  else
    echo "FAIL  $f"; grep -E "error|Error" "$logdir/$b.log" | head -20
    status=1
  fi
done
[ $status -eq 0 ] && echo "check_aarch64: all sources compile for aarch64 ($("$CXX_A64" -dumpmachine))"
exit $status
