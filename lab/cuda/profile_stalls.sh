#!/usr/bin/env bash
# One device call: build tq + test_cuda (sm_90 only), run the GPU tests, then
# ncu warp-stall breakdowns (cycles per issued instruction, by reason) of one
# tensor-core decode launch, Llama turbo4 at 8 x 32K and 1 x 32K, for
# docs/kernel-notes.md. Output in $OUT.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -n ${NO_BUILD:-} ]] || { lab_configure && lab_build tq test_cuda || exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
[[ -n ${NO_BUILD:-} ]] || lab_test_cuda
METRICS=$(printf '%s,' \
  smsp__issue_active.avg.pct_of_peak_sustained_active smsp__warps_eligible.avg.per_cycle_active \
  smsp__warps_active.avg.per_cycle_active gpu__time_duration.sum smsp__inst_executed.sum \
  smsp__average_warps_issue_stalled_{barrier,branch_resolving,dispatch_stall,drain,imc_miss,lg_throttle,long_scoreboard,math_pipe_throttle,membar,mio_throttle,misc,no_instruction,not_selected,selected,short_scoreboard,sleeping,tex_throttle,wait}_per_issue_active.ratio)
for batch in 8 1; do
  timeout 150 ncu --clock-control none -k regex:decode_tc_kernel --launch-skip 3 --launch-count 1 \
    --metrics "${METRICS%,}" --csv --page raw "$B/tools/tq/tq" gpu-bench --shape llama --batch $batch \
    --context 32768 --preset turbo4 --runs 20 --no-append >"$OUT/stalls_b${batch}.csv" 2>"$OUT/stalls_b${batch}.err"
  echo "ncu batch $batch rc=$?"
done
echo "total $(( $(date +%s) - t0 )) s"
