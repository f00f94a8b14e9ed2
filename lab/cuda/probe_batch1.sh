#!/usr/bin/env bash
# One device call: where the batch-1 decode time goes (docs/kernel-notes.md,
# eleventh session). Builds tq (sm_90), times Llama turbo4 at batch 1 over
# contexts 4K..128K (events: the line's intercept is the fixed cost), then ncu
# at boost clocks (--clock-control none) for the duration of each kernel of
# one attend (decode_tc, merge) and the executed instructions of the
# tensor-core kernel at 8 x 32K (per 16-token tile: / 131072).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
lab_configure && lab_build tq || exit 1
TQ=$B/tools/tq/tq
echo "built at $(( $(date +%s) - t0 )) s"
timeout 150 "$TQ" gpu-bench --shape llama --batch 1 --context 4096,16384,32768,65536,131072 --preset turbo4 \
  --no-append --runs 30 --json-file "$OUT/b1.json" 2>/dev/null | grep -E "^llama" | grep -v dense
ncu_kernels() {  # args: ncu output csv, then gpu-bench args
  local csv=$1; shift
  timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum,smsp__inst_executed.sum --csv \
    --print-units base -k 'regex:decode_tc|merge' "$TQ" gpu-bench --shape llama --preset turbo4 --runs 20 \
    --no-append "$@" >"$csv" 2>/dev/null
  python3 lab/cuda/ncu_summary.py "$csv" 40
}
for c in 4096 32768 131072; do echo "ncu batch 1 context $c"; ncu_kernels "$OUT/ncu_b1_$c.csv" --batch 1 --context $c; done
echo "ncu batch 8 context 32768 (131072 tiles)"; ncu_kernels "$OUT/ncu_b8.csv" --batch 8 --context 32768
echo "total $(( $(date +%s) - t0 )) s"
