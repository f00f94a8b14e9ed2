#!/usr/bin/env bash
# Device probe of the batch-1 fixed cost (docs/kernel-notes.md): builds tq and
# test_cuda (Release, CUDA), runs the GPU tests, lab/cuda/fixed_cost.cu, a
# batch-1 gpu-bench and ncu per-kernel durations. Carry build/gpu-deps.
# Output in $OUT (default ./probe-out).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/probe-out}
mkdir -p "$OUT"
B=${TQ_GPU_BUILD:-/tmp/tq-gpu-build}
T0=$SECONDS
log() { echo "[$((SECONDS - T0)) s] $*"; }
nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -o /tmp/fixed_cost lab/cuda/fixed_cost.cu >"$OUT/probe_build.log" 2>&1 &
NVPID=$!
cmake -S "$ROOT" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQ_CUDA=ON -DTQ_BUILD_TESTS=ON \
  -DTQ_BUILD_TOOLS=ON -DTQ_BUILD_BENCH=OFF -DTQ_CUDA_ARCHS=90-real "-DCMAKE_PREFIX_PATH=$ROOT/build/gpu-deps" >"$OUT/build.log" 2>&1 &&
  cmake --build "$B" -j 16 --target tq test_cuda >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
wait $NVPID || { cat "$OUT/probe_build.log"; }
log built
"$B/tests/test_cuda" >"$OUT/test_cuda.log" 2>&1; log "test_cuda rc=$?"; grep -E "PASSED|FAILED|worst" "$OUT/test_cuda.log"
[[ -x /tmp/fixed_cost ]] && { timeout 120 /tmp/fixed_cost >"$OUT/fixed_cost.txt" 2>&1; log "fixed_cost rc=$?"; cat "$OUT/fixed_cost.txt"; }
TQ=$B/tools/tq/tq
timeout 200 "$TQ" gpu-bench --batch 1 --context 32768,131072 --preset turbo4,paper_mse --no-append \
  --json-file "$OUT/bench_b1.json" >"$OUT/bench_b1.txt" 2>&1; log "bench rc=$?"; cat "$OUT/bench_b1.txt" | grep -v "^gpu-bench:"
timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed \
  --csv --print-units base -k 'regex:decode|merge|dense' "$TQ" gpu-bench --batch 1 --context 32768 \
  --preset turbo4 --runs 20 --no-append >"$OUT/ncu_b1.csv" 2>"$OUT/ncu_b1.err"; log "ncu rc=$?"
python3 lab/cuda/ncu_summary.py "$OUT/ncu_b1.csv" 60
log done
