#!/usr/bin/env bash
# After scripts/gpu_suite.sh built $TQ_GPU_BUILD: an ncu profile of one
# tensor-core decode launch (Llama shape, batch 8 x 32K, turbo4): the full
# section set as CSV and the per-SASS-instruction source page (executed
# instructions, stall reasons), for docs/kernel-notes.md. Output in $OUT.
set -uo pipefail
B=${TQ_GPU_BUILD:-/tmp/tq-gpu-build}
OUT=${OUT:-./gpu-out}
REP=/tmp/tq-tc-profile
rm -f "$REP.ncu-rep"
timeout 240 ncu --clock-control none --set full --import-source yes -k regex:decode_tc_kernel \
  --launch-skip 3 --launch-count 1 -o "$REP" "$B/tools/tq/tq" gpu-bench --shape llama --batch 8 \
  --context 32768 --preset turbo4 --runs 20 --no-append >"$OUT/ncu_profile.log" 2>&1
echo "ncu rc=$?"
ncu -i "$REP.ncu-rep" --page details --csv >"$OUT/ncu_details.csv" 2>&1
ncu -i "$REP.ncu-rep" --page source --csv --print-source sass >"$OUT/ncu_sass.csv" 2>&1
ls -la "$OUT"/ncu_*
grep -E '"(Duration|Memory Throughput|DRAM Throughput|Issue Slots Busy|Executed Ipc Active|Registers Per Thread|Achieved Occupancy|No Eligible|One or More Eligible)"' "$OUT/ncu_details.csv" | cut -c1-220 | head -20
