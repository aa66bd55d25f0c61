#!/usr/bin/env bash
# The GPU check, run from the repository root on the GPU machine (no internet; torch, nanobind,
# scikit-build-core, cmake, ninja, pytest and triton already installed):
#
#   bash tools/gpu_check.sh                 # build + install this tree, then check
#   bash tools/gpu_check.sh dist/X.whl      # install a prebuilt wheel instead
#   bash tools/gpu_check.sh --no-install    # use whatever sageattn is installed
#
# Steps: install, `python -m sageattn`, `pytest -m gpu -s tests/gpu` (every file there:
# test_sm80.py, test_sm89.py (forced where it is not the default), test_sm90.py (9.0 only), ...),
# bench/bench_paths.py (whole calls of the auto path and of each forced path, the sm90 and sm80
# kernels alone, torch SDPA cuDNN and flash; B=4 H=32, hd 64 and 128, S 1k..16k, causal and not;
# about a minute on an H100; BENCH_ARGS="--quick" for hd128 at 4k/16k only), writing
# $OUT/bench.md and $OUT/bench.png (when matplotlib is there).
# Logs go to $OUT (or ./gpu_check_out); a short summary (probe, acceptance rows of the tests,
# the benchmark's issue-3 acceptance lines and headline numbers, the steps) is printed last.
# Environment: SAGEATTN_CUDA_ARCHS narrows the build (e.g. 90), STEPS picks steps
# ("install probe tests bench"), BENCH_ARGS passes arguments to the benchmark, PYTEST_ARGS to
# pytest (e.g. "-k sm90": the tests of test_sm90.py, selected by name).
# Exit status: 0 when every step ran and passed.
set -uo pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-install probe tests bench}"
ARG="${1:-}"

declare -a NAMES RCS SECS
run_step() {  # run_step NAME LOGFILE CMD...
  local name="$1" log="$2"
  shift 2
  local start=$SECONDS
  echo "=== $name: $*" | tee "$log"
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  NAMES+=("$name")
  RCS+=("$rc")
  SECS+=("$((SECONDS - start))")
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  return "$rc"
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

if want install && [[ "$ARG" != "--no-install" ]]; then
  if [[ -n "$ARG" && -f "$ARG" ]]; then
    run_step install "$OUT/install.log" "$PY" -m pip install --no-deps --force-reinstall "$ARG"
  else
    run_step install "$OUT/install.log" \
      "$PY" -m pip install -v --no-build-isolation --no-deps --force-reinstall .
  fi || STEPS="none"   # nothing else can run without the package
fi

# Run everything from a scratch directory so `import sageattn` finds the installed package,
# never the source tree.
ROOT="$PWD"
cd "$(mktemp -d)" || exit 1

if want probe; then
  run_step probe "$OUT/probe.log" "$PY" -m sageattn
fi
if want tests; then
  # shellcheck disable=SC2086
  export SAGEATTN_GPU_SUMMARY="$OUT/gpu_errors.md"
  run_step tests "$OUT/pytest_gpu.log" \
    "$PY" -m pytest -m gpu -q -s -p no:cacheprovider ${PYTEST_ARGS:-} "$ROOT/tests/gpu"
fi
if want bench; then
  # shellcheck disable=SC2086
  run_step bench "$OUT/bench.log" "$PY" "$ROOT/bench/bench_paths.py" --out "$OUT/bench.md" \
    --plot "$OUT/bench.png" ${BENCH_ARGS:-}
fi

echo
echo "================ sageattn GPU check ================"
if [[ -f "$OUT/probe.log" ]]; then
  grep -E "^ *(device|path|runs_as|kernel|toolkit):" "$OUT/probe.log" | head -6
fi
if [[ -f "$OUT/pytest_gpu.log" ]]; then
  grep -E "^ACCEPT" "$OUT/pytest_gpu.log"
  grep -E "(passed|failed|error)" "$OUT/pytest_gpu.log" | tail -1
fi
if [[ -f "$OUT/gpu_errors.md" ]]; then
  # The acceptance rows of the error table (kernel and emulator vs the fp32 reference).
  head -2 "$OUT/gpu_errors.md"
  grep -E "ACCEPT|torch SDPA" "$OUT/gpu_errors.md"
fi
if [[ -f "$OUT/bench.md" ]]; then
  # The issue-3 acceptance lines and the headline numbers (full tables: $OUT/bench.md).
  sed -n '/^#### Issue 3 acceptance/,$p' "$OUT/bench.md"
  grep -q '^#### Issue 3 acceptance' "$OUT/bench.md" || sed -n '/^### Headline/,$p' "$OUT/bench.md"
  echo "(full benchmark tables: $OUT/bench.md)"
fi
echo
printf '| %-8s | %-6s | %6s |\n' step status seconds
printf '|----------|--------|--------|\n'
status=0
for i in "${!NAMES[@]}"; do
  if [[ "${RCS[$i]}" == 0 ]]; then s=ok; else s="FAIL"; status=1; fi
  printf '| %-8s | %-6s | %6s |\n' "${NAMES[$i]}" "$s" "${SECS[$i]}"
done
echo "logs: $OUT"
exit "$status"
