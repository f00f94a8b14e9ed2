#!/usr/bin/env bash
# One device call: build tq (sm_90 only), then ncu of the quantize-append
# kernel in the prefill append of `tq gpu-bench` (Llama shape, turbo4,
# 131,072 tokens): durations of every append launch, warp-stall reasons
# (cycles per issued instruction) and the full section set + per-SASS page of
# the first bf16-input launch, for docs/kernel-notes.md; before that the GPU
# tests and a plain timing. Output in $OUT. NO_BUILD=1 reuses a warm
# machine's build, NO_TEST=1 skips the tests, SHAPE=gemma profiles the d-256
# append instead (it passes that one --shape).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -n ${NO_BUILD:-} ]] || { lab_configure && lab_build tq test_cuda || exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
[[ -n ${NO_TEST:-} ]] || lab_test_cuda
# Plain timing (no profiler): prefill append of 131,072 tokens, kernels and API.
SHAPE=${SHAPE:-llama}
timeout 200 "$B/tools/tq/tq" gpu-bench --shape "$SHAPE" --batch 1 --context 4096 --preset turbo4,paper_mse,turbo3 \
  --runs 20 --append-runs 10 --json-file "$OUT/append_bench.json" 2>&1 | grep -A12 '^append' | grep -v decode
BENCH=("$B/tools/tq/tq" gpu-bench --shape "$SHAPE" --batch 1 --context 4096 --preset "${PRESET:-turbo4}" --runs 20 --append-runs 2)
# Pass 1: every append launch, its name and duration (to find the bf16 ones).
timeout 200 ncu --clock-control none --kernel-name-base demangled -k regex:mse_append_kernel \
  --metrics gpu__time_duration.sum,launch__grid_size,launch__registers_per_thread,smsp__issue_active.avg.pct_of_peak_sustained_active \
  --csv --page raw "${BENCH[@]}" >"$OUT/append_launches.csv" 2>"$OUT/append_launches.err"
echo "pass 1 rc=$?"
# Index (0-based, among append launches) of the first bf16-input launch.
idx=$(python3 - "$OUT/append_launches.csv" <<'PY'
import csv, re, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
hdr = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
name = rows[hdr].index("Kernel Name")
data = [r for r in rows[hdr + 2:] if len(r) > name]
for i, r in enumerate(data):
    # demangled: mse_append_kernel<D, BITS, IN, MODE>, IN 2 = DType::bf16
    if re.search(r"mse_append_kernel<\d+, \d+, 2, ", r[name]):
        print(i); break
else:
    print(-1)
PY
)
echo "first bf16 launch: $idx"
[[ $idx -ge 0 ]] || exit 1
METRICS=$(printf '%s,' \
  smsp__issue_active.avg.pct_of_peak_sustained_active smsp__warps_eligible.avg.per_cycle_active \
  smsp__warps_active.avg.per_cycle_active gpu__time_duration.sum dram__throughput.avg.pct_of_peak_sustained_elapsed \
  sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active \
  sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active \
  smsp__inst_executed.sum \
  smsp__average_warps_issue_stalled_{barrier,branch_resolving,dispatch_stall,drain,imc_miss,lg_throttle,long_scoreboard,math_pipe_throttle,membar,mio_throttle,misc,no_instruction,not_selected,selected,short_scoreboard,sleeping,tex_throttle,wait}_per_issue_active.ratio)
timeout 150 ncu --clock-control none -k regex:mse_append_kernel --launch-skip "$idx" --launch-count 2 \
  --metrics "${METRICS%,}" --csv --page raw "${BENCH[@]}" >"$OUT/append_stalls.csv" 2>"$OUT/append_stalls.err"
echo "stalls rc=$?"
REP=/tmp/tq-append-profile
rm -f "$REP.ncu-rep"
timeout 200 ncu --clock-control none --set full --import-source yes -k regex:mse_append_kernel \
  --launch-skip "$idx" --launch-count 1 -o "$REP" "${BENCH[@]}" >"$OUT/append_full.log" 2>&1
echo "full rc=$?"
ncu -i "$REP.ncu-rep" --page details --csv >"$OUT/append_details.csv" 2>&1
ncu -i "$REP.ncu-rep" --page source --csv --print-source sass >"$OUT/append_sass.csv" 2>&1
grep -E '"(Duration|Memory Throughput|DRAM Throughput|Issue Slots Busy|Executed Ipc Active|Registers Per Thread|Achieved Occupancy|No Eligible|One or More Eligible|Theoretical Occupancy|Block Limit Registers|Block Limit Shared Mem)"' "$OUT/append_details.csv" | cut -c1-220 | head -20
echo "total $(( $(date +%s) - t0 )) s"
