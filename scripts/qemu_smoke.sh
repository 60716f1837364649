#!/usr/bin/env bash
# The emulated AVX2-only CPU smoke (scripts/qemu_smoke.py) under `qemu-x86_64 -cpu Haswell`
# (Debian: qemu-user): fails on a SIGILL or a wrong answer from any ISA dependence in fastlm or in
# what it calls in torch. ~5-8 min on 2 cores (importing torch emulated takes ~50 s).
# Usage: scripts/qemu_smoke.sh   (PYTHON picks the python; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
command -v qemu-x86_64 >/dev/null || { echo "qemu_smoke: qemu-x86_64 not found (apt-get install qemu-user)" >&2; exit 2; }
start=$(date +%s)
# TRITON_INTERPRET stays off: the smoke never touches Triton. OMP threads: 2 (the emulator is slow
# enough; more threads only contend).
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2 \
  timeout "${QEMU_SMOKE_TIMEOUT:-1200}" qemu-x86_64 -cpu Haswell "$PY" scripts/qemu_smoke.py
echo "qemu_smoke: passed in $(( $(date +%s) - start )) s"
