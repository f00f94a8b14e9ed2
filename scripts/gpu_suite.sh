#!/usr/bin/env bash
# The GPU suite of issue 5, one command on a machine with an NVIDIA GPU:
# builds from a clean checkout (Release, CUDA on, tests + tools), runs the GPU
# tests, compute-sanitizer memcheck and racecheck on them, PyTorch SDPA
# (scripts/sdpa_bench.py) and `tq gpu-bench`, and leaves every log and JSON in
# $OUT (default ./gpu-out), 8 files at most, with a short summary at the end.
# Needs no network: GoogleTest is built from build/gtest-src when the machine
# has none; CLI11 and nlohmann_json (header-only) come from build/gpu-deps
# when the machine has none. Make build/gpu-deps on a machine that has them:
#   bash scripts/gpu_suite.sh --prepare-deps     # copies /usr headers + cmake configs
# Then on the GPU machine (carry build/gtest-src and build/gpu-deps):
#   bash scripts/gpu_suite.sh            # the full grid, ~5-8 min on an H200 host
#   bash scripts/gpu_suite.sh --quick    # fewer shapes
# Environment: OUT, TQ_JOBS (default 16), TQ_GPU_BUILD (default /tmp/tq-gpu-build),
# TQ_CUDA_ARCHS (e.g. 90-real: only sm_90 code, a faster build),
# TQ_SUITE_BUDGET (seconds for the whole run, default 540: later steps shrink
# their time limits to fit, the sanitizers last).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD

QUICK=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    --prepare-deps)
      D=$ROOT/build/gpu-deps
      rm -rf "$D" && mkdir -p "$D/include" "$D/share/cmake" || exit 1
      for h in /usr/include/CLI /usr/include/nlohmann; do
        [[ -d $h ]] || { echo "gpu_suite.sh: $h missing (install libcli11-dev nlohmann-json3-dev)" >&2; exit 1; }
        cp -r "$h" "$D/include/"
      done
      for c in /usr/share/cmake/CLI11 /usr/share/cmake/nlohmann_json; do
        [[ -d $c ]] || { echo "gpu_suite.sh: $c missing" >&2; exit 1; }
        cp -r "$c" "$D/share/cmake/"
      done
      if [[ ! -f $ROOT/build/gtest-src/CMakeLists.txt && -f /usr/src/googletest/CMakeLists.txt ]]; then
        cp -r /usr/src/googletest "$ROOT/build/gtest-src"
      fi
      echo "gpu_suite.sh: wrote $D ($(du -sh "$D" | cut -f1)); carry build/gpu-deps and build/gtest-src"
      exit 0 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$arg' (expected --quick, --prepare-deps)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
JOBS=${TQ_JOBS:-16}
B=${TQ_GPU_BUILD:-/tmp/tq-gpu-build}
BUDGET=${TQ_SUITE_BUDGET:-540}
export PYTHONUNBUFFERED=1
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
T0=$SECONDS
failed=()

say() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME CAP LOG CMD...: runs CMD under min(CAP, what is left of the budget),
# appending to LOG; records NAME as failed on a non-zero exit.
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$((BUDGET - (SECONDS - T0)))
  local lim=$((cap < left ? cap : left))
  if ((lim < 15)); then
    say "[$name] SKIPPED: the ${BUDGET} s budget is spent"
    failed+=("$name(skipped)")
    return 1
  fi
  local t=$SECONDS
  echo "==> [$name] $* (limit ${lim} s)" >>"$log"
  timeout -k 10 "$lim" "$@" >>"$log" 2>&1
  local rc=$?
  if ((rc == 0)); then
    say "[$name] ok ($((SECONDS - t)) s)"
  else
    if ((rc == 124)); then
      say "[$name] TIMED OUT after ${lim} s, see $(basename "$log")"
    else
      say "[$name] FAILED rc=$rc ($((SECONDS - t)) s), see $(basename "$log")"
    fi
    failed+=("$name")
  fi
  return $rc
}

# ---- machine ----------------------------------------------------------------
{
  echo "gpu_suite.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) quick=$QUICK commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty')"
  nvidia-smi -L 2>&1 | head -4
  echo "nvcc: $(nvcc --version 2>&1 | tail -1)"
  echo "cmake: $(cmake --version | head -1); $(c++ --version | head -1); $(nproc) cores"
  echo "python3: $(python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1)"
} 2>&1 | tee -a "$SUMMARY"

# ---- dependencies (no network) -----------------------------------------------
BLOG=$OUT/build.log
: >"$BLOG"
PREFIX="$ROOT/build/gpu-deps"
probe_gtest() {
  local d=/tmp/tq-probe-gtest
  rm -rf $d && mkdir -p $d
  printf 'cmake_minimum_required(VERSION 3.16)\nproject(p CXX)\nfind_package(GTest REQUIRED)\n' >$d/CMakeLists.txt
  cmake -S $d -B $d/b -DCMAKE_PREFIX_PATH="$PREFIX" >/dev/null 2>&1
}
build_gtest() {
  local src=
  for s in "$ROOT/build/gtest-src" "$ROOT/build/gpu-deps/gtest-src"; do
    [[ -f $s/CMakeLists.txt ]] && { src=$s; break; }
  done
  [[ -n $src ]] || { echo "no GoogleTest installed and no sources at build/gtest-src (carry it)"; return 1; }
  cmake -S "$src" -B /tmp/tq-gtest-build -G "$GEN" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX=/tmp/tq-gtest -DBUILD_GMOCK=OFF -DINSTALL_GTEST=ON &&
    cmake --build /tmp/tq-gtest-build -j "$JOBS" --target install
}
GEN=Ninja
command -v ninja >/dev/null || GEN="Unix Makefiles"
export ROOT JOBS GEN
export -f build_gtest  # `timeout` runs programs, not shell functions
if probe_gtest; then
  say "[gtest] installed on this machine"
else
  step gtest 120 "$BLOG" bash -c build_gtest && PREFIX="$PREFIX;/tmp/tq-gtest"
fi
[[ -d $ROOT/build/gpu-deps ]] || say "note: no build/gpu-deps carried: CLI11 and nlohmann_json must be installed here"

# ---- configure + build -------------------------------------------------------
ARCH_ARGS=()
[[ -n ${TQ_CUDA_ARCHS:-} ]] && ARCH_ARGS=("-DTQ_CUDA_ARCHS=$TQ_CUDA_ARCHS")
step configure 120 "$BLOG" cmake -S "$ROOT" -B "$B" -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DTQ_CUDA=ON \
  -DTQ_BUILD_TESTS=ON -DTQ_BUILD_TOOLS=ON -DTQ_BUILD_BENCH=OFF "-DCMAKE_PREFIX_PATH=$PREFIX" "${ARCH_ARGS[@]}" &&
  step build 330 "$BLOG" cmake --build "$B" -j "$JOBS" --target tq test_cuda test_cuda_dense
if [[ ! -x $B/tools/tq/tq || ! -x $B/tests/test_cuda_dense ]]; then
  say "build failed: first errors:"
  grep -m8 -A6 -E "error|Error" "$BLOG" | head -60 | tee -a "$SUMMARY"
  exit 1
fi

# ---- GPU tests ----------------------------------------------------------------
TLOG=$OUT/tests.log
: >"$TLOG"
step test_cuda_dense 150 "$TLOG" "$B/tests/test_cuda_dense"
step test_cuda 200 "$TLOG" "$B/tests/test_cuda"

# ---- benchmarks: SDPA first, so that gpu-bench can add its ratios --------------
# The issue's presets, and the outlier-channel ones (tensor cores since the twenty-fourth session).
BENCH_ARGS=(--preset 'turbo4,paper_mse,turbo3,turbo2.5,turbo4-out,paper_mse-out')
SDPA_ARGS=()
if ((QUICK)); then
  BENCH_ARGS+=(--batch '1,8' --context '32768,131072')
  SDPA_ARGS=(--quick)
fi
step sdpa_bench 200 "$OUT/sdpa.log" python3 "$ROOT/scripts/sdpa_bench.py" "${SDPA_ARGS[@]}" --out "$OUT/sdpa.json"
[[ -s $OUT/sdpa.json ]] && BENCH_ARGS+=(--sdpa "$OUT/sdpa.json")
step gpu_bench 240 "$OUT/gpu_bench.log" "$B/tools/tq/tq" gpu-bench "${BENCH_ARGS[@]}" --json-file "$OUT/gpu_bench.json"
# Sliding-window layers (Gemma's local ones, window 1024): the window's tokens
# only; the dense bf16 row reads the window too (table in gpu_bench.log; no
# JSON file: the device returns at most 8 files).
step gpu_bench_window 90 "$OUT/gpu_bench.log" "$B/tools/tq/tq" gpu-bench --shape gemma,llama --batch 1,8 \
  --context 131072 --preset turbo4,paper_mse --window 1024 --no-append
# A bf16 engine's calls: bf16 query and output (the query widened by one
# small kernel before the decode kernel); compare with the f32 rows above.
IO_ARGS=(--shape llama,gemma --batch 1,8 --context 32768,131072 --preset turbo4 --io bf16 --no-append)
[[ -s $OUT/sdpa.json ]] && IO_ARGS+=(--sdpa "$OUT/sdpa.json")
step gpu_bench_bf16_io 90 "$OUT/gpu_bench.log" "$B/tools/tq/tq" gpu-bench "${IO_ARGS[@]}"

# ---- compute-sanitizer (last: the slowest and least predictable) ---------------
SLOG=$OUT/sanitizer.log
: >"$SLOG"
if command -v compute-sanitizer >/dev/null; then
  DENSE_SMALL='CudaDense.Bf16QueryExplicitScaleAndOddGroups:CudaDense.PlanAndArgumentChecks'
  LAYER_SMALL='CudaBench.ReadFloorVariantsTakeAnySizeAndRefuseBadArguments:CudaSplit.AppendInputTypesAgree:CudaAppend.BatchOfDecodeTokensLandsInEachSequence:CudaAppend.AsyncBatchMatchesSyncAndRefusalIsStickyThenRecovered:CudaSplit.RecordsAndAttentionMatchKvCache:CudaAppend.MisalignedDevicePointers:CudaAppend.KernelOnlyRewriteIsIdempotent:CudaAttention.MatchesKvCacheAttend:CudaAttention.RejectsBadShapes:CudaAttentionTc.AwkwardNormsAndZeroVectors:CudaWindow.DenseWindowAndPrefixMatchKvCache:CudaWindow.SlidingWindowFreesPagesAndKeepsAttention:CudaGraph.StepKernelMatchesTileKernels:CudaAttentionTc.DevicePlanIsTheHostPlan:CudaAttention.HalfPrecisionQueryAndOutput'
  step memcheck_dense 90 "$SLOG" compute-sanitizer --tool memcheck --error-exitcode 9 "$B/tests/test_cuda_dense" --gtest_filter="$DENSE_SMALL"
  step memcheck_layer 90 "$SLOG" compute-sanitizer --tool memcheck --error-exitcode 9 "$B/tests/test_cuda" --gtest_filter="$LAYER_SMALL"
  step racecheck_dense 90 "$SLOG" compute-sanitizer --tool racecheck --error-exitcode 9 "$B/tests/test_cuda_dense" --gtest_filter='CudaDense.Bf16QueryExplicitScaleAndOddGroups'
  step racecheck_layer 90 "$SLOG" compute-sanitizer --tool racecheck --error-exitcode 9 "$B/tests/test_cuda" --gtest_filter='CudaAppend.KernelOnlyRewriteIsIdempotent:CudaSplit.RecordsAndAttentionMatchKvCache:CudaAttention.MatchesKvCacheAttend:CudaAttentionTc.AwkwardNormsAndZeroVectors:CudaWindow.DenseWindowAndPrefixMatchKvCache:CudaGraph.CapturedAttendReplansAsSequencesGrow'
else
  say "[sanitizers] SKIPPED: compute-sanitizer is not on the PATH"
fi

# ---- summary -----------------------------------------------------------------
{
  echo "---- tests"
  grep -E "^==> |^\[  PASSED  \]|^\[  FAILED  \]|^\[  SKIPPED \] [0-9]+ test|worst normalised" "$TLOG" |
    sed -E 's|^==> \[([a-z_]+)\].*|\1:|' | head -30
  echo "---- sanitizers"
  grep -oE "^==> \[[a-z_]+\]|ERROR SUMMARY.*|RACECHECK SUMMARY.*" "$SLOG" | head -20
  echo "---- sdpa (fastest backend per shape)"
  sed -n '/^fastest per shape/,$p' "$OUT/sdpa.log" 2>/dev/null | head -20
  echo "---- tq gpu-bench"
  grep -vE "^gpu-bench: " "$OUT/gpu_bench.log" 2>/dev/null | grep -vE "^==> " | head -110
  echo "---- total $((SECONDS - T0)) s; files in $OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ')"
} | tee -a "$SUMMARY"
if ((${#failed[@]})); then
  say "gpu_suite.sh: FAILED steps: ${failed[*]}"
  exit 1
fi
say "gpu_suite.sh: all steps passed"
