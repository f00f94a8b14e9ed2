#!/usr/bin/env bash
# One device call: does the batch-1 fixed cost come from fetching the kernels'
# code from DRAM after the harness's L2 flush? (docs/kernel-notes.md,
# twenty-first session). Runs lab/cuda/code_fetch.cu (straight-line code
# cold / warm), then tq gpu-bench (Llama turbo4, batch 1 and 8) with and
# without the flush (lab/cuda/noflush.patch, applied here to the device's
# copy only), then ncu stall reasons of the decode and merge kernels at 1 x 4K.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -o /tmp/code_fetch lab/cuda/code_fetch.cu >"$OUT/code_fetch_build.log" 2>&1 &
NV=$!
patch -p1 < lab/cuda/noflush.patch || exit 1
lab_configure && lab_build tq || exit 1
wait $NV
echo "built $(( $(date +%s) - t0 )) s"
timeout 120 /tmp/code_fetch | tee "$OUT/code_fetch.txt"
TQ=$B/tools/tq/tq
ARGS=(gpu-bench --shape llama --batch 1,8 --context 4096,32768,131072 --preset turbo4,turbo3 --no-append --runs 30)
timeout 150 "$TQ" "${ARGS[@]}" --json-file "$OUT/flush.json" >"$OUT/flush.txt" 2>&1; echo "flush rc=$?"
TQ_LAB_NOFLUSH=1 timeout 150 "$TQ" "${ARGS[@]}" --json-file "$OUT/noflush.json" >"$OUT/noflush.txt" 2>&1; echo "noflush rc=$?"
paste <(grep -E "^llama" "$OUT/flush.txt" | awk '{print $1,$2,$3,$4,$5}') <(grep -E "^llama" "$OUT/noflush.txt" | awk '{print $5}')
METRICS=$(printf '%s,' gpu__time_duration.sum smsp__inst_executed.sum smsp__issue_active.avg.pct_of_peak_sustained_active \
  smsp__average_warps_issue_stalled_{barrier,branch_resolving,dispatch_stall,imc_miss,long_scoreboard,math_pipe_throttle,membar,mio_throttle,no_instruction,short_scoreboard,sleeping,wait,lg_throttle}_per_issue_active.ratio)
timeout 150 ncu --clock-control none -k 'regex:decode_tc|merge' --launch-skip 6 --launch-count 2 \
  --metrics "${METRICS%,}" --csv --page raw "$TQ" gpu-bench --shape llama --batch 1 --context 4096 --preset turbo4 \
  --runs 20 --no-append >"$OUT/stalls_1x4k.csv" 2>"$OUT/stalls_1x4k.err"; echo "ncu rc=$?"
python3 - "$OUT/stalls_1x4k.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
h = next(i for i, r in enumerate(rows) if 'Kernel Name' in r)
hdr = rows[h]
for r in rows[h + 2:]:
    d = dict(zip(hdr, r))
    print(d['Kernel Name'][:60])
    for k in hdr:
        if k.startswith(('smsp__', 'gpu__')): print('  ', k.replace('smsp__average_warps_issue_stalled_', 'stall ').replace('_per_issue_active.ratio', ''), d[k])
PY
echo "total $(( $(date +%s) - t0 )) s"
