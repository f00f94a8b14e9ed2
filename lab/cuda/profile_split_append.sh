#!/usr/bin/env bash
# One device call: build tq + test_cuda (sm_90), the split tests, the prefill
# append timing of turbo2.5 / turbo3.5 (Llama shape, 131,072 tokens), then ncu
# of the longest of the first ten split-append launches (the lane kernel; the
# decode set-up's small appends come first): duration, executed warp
# instructions, issue activity, occupancy and warp-stall reasons. Output in
# $OUT. NO_BUILD=1 reuses a warm machine's build.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -n ${NO_BUILD:-} ]] || { lab_configure && lab_build tq test_cuda || exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
timeout 120 "$B/tests/test_cuda" --gtest_filter='CudaSplit.*:CudaAppend.*' >"$OUT/test_split.log" 2>&1
echo "tests rc=$? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/test_split.log" | tr '\n' ' ')"
BENCH=("$B/tools/tq/tq" gpu-bench --shape llama --batch 1 --context 4096 --preset "${PRESET:-turbo2.5}")
timeout 150 "$B/tools/tq/tq" gpu-bench --shape llama --batch 1 --context 4096 --preset turbo4,turbo3.5,turbo2.5 \
  --runs 20 --append-runs 10 2>&1 | grep -A8 '^append' | grep -v decode
METRICS=$(printf '%s,' gpu__time_duration.sum smsp__inst_executed.sum smsp__issue_active.avg.pct_of_peak_sustained_active \
  smsp__warps_active.avg.per_cycle_active smsp__warps_eligible.avg.per_cycle_active launch__registers_per_thread \
  launch__grid_size sm__warps_active.avg.pct_of_peak_sustained_active \
  smsp__average_warps_issue_stalled_{barrier,branch_resolving,dispatch_stall,lg_throttle,long_scoreboard,math_pipe_throttle,membar,mio_throttle,no_instruction,not_selected,selected,short_scoreboard,wait}_per_issue_active.ratio)
timeout 150 ncu --clock-control none -k regex:"${KERNEL:-halves_lane}" --launch-count 10 \
  --metrics "${METRICS%,}" --csv --page raw "${BENCH[@]}" --runs 20 --append-runs 1 >"$OUT/split_append_ncu.csv" 2>"$OUT/split_append_ncu.err"
echo "ncu rc=$?"
python3 - "$OUT/split_append_ncu.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
hdr = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
names, units = rows[hdr], rows[hdr + 1]
# The decode set-up's small appends launch first: the longest launch is the prefill's.
t = names.index("gpu__time_duration.sum")
vals = max(rows[hdr + 2:], key=lambda r: float(r[t].replace(",", "")) if len(r) == len(names) else -1)
for n, u, v in zip(names, units, vals):
    if any(k in n for k in ("gpu__", "smsp__", "launch__", "sm__", "Kernel Name")):
        print(f"{n:90s} {v} {u}")
PY
echo "total $(( $(date +%s) - t0 )) s"
