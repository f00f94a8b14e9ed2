#!/usr/bin/env bash
# One device call: build tq + test_cuda (sm_90 only), run the GPU tests, then
# ncu warp-stall breakdowns (cycles per issued instruction, by reason) of one
# tensor-core decode launch, Llama turbo4 at 8 x 32K and 1 x 32K, for
# docs/kernel-notes.md. Output in $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
B=${TQ_GPU_BUILD:-/tmp/tq-gpu-build}
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
t0=$(date +%s)
[[ -n ${NO_BUILD:-} ]] || { cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQ_CUDA=ON -DTQ_BUILD_TESTS=ON -DTQ_BUILD_TOOLS=ON \
  -DTQ_BUILD_BENCH=OFF -DCMAKE_PREFIX_PATH="$PWD/build/gpu-deps" -DTQ_CUDA_ARCHS=90-real >"$OUT/build.log" 2>&1 &&
  cmake --build "$B" -j16 --target tq test_cuda >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }; }
echo "build $(( $(date +%s) - t0 )) s"
[[ -n ${NO_BUILD:-} ]] || timeout 200 "$B/tests/test_cuda" >"$OUT/test_cuda.log" 2>&1
echo "test_cuda rc=$? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/test_cuda.log" | tr '\n' ' ')"
METRICS=$(printf '%s,' \
  smsp__issue_active.avg.pct_of_peak_sustained_active smsp__warps_eligible.avg.per_cycle_active \
  smsp__warps_active.avg.per_cycle_active gpu__time_duration.sum \
  smsp__average_warps_issue_stalled_{barrier,branch_resolving,dispatch_stall,drain,imc_miss,lg_throttle,long_scoreboard,math_pipe_throttle,membar,mio_throttle,misc,no_instruction,not_selected,selected,short_scoreboard,sleeping,tex_throttle,wait}_per_issue_active.ratio)
for batch in 8 1; do
  timeout 150 ncu --clock-control none -k regex:decode_tc_kernel --launch-skip 3 --launch-count 1 \
    --metrics "${METRICS%,}" --csv --page raw "$B/tools/tq/tq" gpu-bench --shape llama --batch $batch \
    --context 32768 --preset turbo4 --runs 20 --no-append >"$OUT/stalls_b${batch}.csv" 2>"$OUT/stalls_b${batch}.err"
  echo "ncu batch $batch rc=$?"
done
echo "total $(( $(date +%s) - t0 )) s"
