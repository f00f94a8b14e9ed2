#!/usr/bin/env bash
# One device call (eighteenth session): which hardware unit the tensor-core
# decode loop is bounded by. ncu of one decode_tc launch (Llama, 8 x 32K) per
# preset: per-pipe busy and issue shares, shared-memory wavefronts (loads,
# stores, bank conflicts; the bulk copies' writes show in the bank writes),
# issue activity; then the ComputeWorkloadAnalysis / MemoryWorkloadAnalysis
# sections in full for turbo4. Then, if lab/cuda/skip_merge.patch applies, the
# wall-clock share of the split merge at batch 1 and 8 (events, A = as is,
# B = TQ_LAB_SKIP_MERGE=1: the merge kernel not launched). Output in $OUT.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ -f lab/cuda/skip_merge.patch ]] && git apply --check lab/cuda/skip_merge.patch 2>/dev/null; then
  git apply lab/cuda/skip_merge.patch && SKIP=1
fi
[[ -n ${NO_BUILD:-} ]] || { lab_configure && lab_build tq || exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
TQ=$B/tools/tq/tq
ncu --version | tail -1
M='regex:^sm__(inst_executed_pipe_[a-z0-9_]+|pipe_[a-z0-9_]+_cycles_active)\.avg\.pct_of_peak_sustained_active$'
M2=$(printf '%s,' smsp__issue_active.avg.pct_of_peak_sustained_active gpu__time_duration.sum \
  smsp__inst_executed.sum sm__cycles_elapsed.avg.per_second \
  l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum \
  l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum l1tex__data_bank_reads.avg.pct_of_peak_sustained_elapsed \
  l1tex__data_bank_writes.avg.pct_of_peak_sustained_elapsed l1tex__data_pipe_lsu_wavefronts.avg.pct_of_peak_sustained_elapsed \
  l1tex__throughput.avg.pct_of_peak_sustained_active smsp__inst_executed_op_shared_ld.sum)
for preset in turbo4 turbo3 paper_mse; do
  for mset in "$M" "${M2%,}"; do
    timeout 120 ncu --clock-control none -k regex:decode_tc_kernel --launch-skip 3 --launch-count 1 \
      --metrics "$mset" --csv --page raw "$TQ" gpu-bench --shape llama --batch 8 --context 32768 \
      --preset $preset --runs 20 --no-append >>"$OUT/pipes_$preset.csv" 2>>"$OUT/pipes.err"
    echo "ncu $preset rc=$?"
  done
done
timeout 120 ncu --clock-control none -k regex:decode_tc_kernel --launch-skip 3 --launch-count 1 \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
  --print-details all "$TQ" gpu-bench --shape llama --batch 8 --context 32768 --preset turbo4 --runs 20 \
  --no-append >"$OUT/sections_turbo4.txt" 2>>"$OUT/pipes.err"
echo "sections rc=$?"
if [[ -n ${SKIP:-} ]]; then
  for r in 1 2; do
    for v in A B; do
      if [[ $v == B ]]; then export TQ_LAB_SKIP_MERGE=1; else unset TQ_LAB_SKIP_MERGE; fi
      timeout 100 "$TQ" gpu-bench --shape llama --batch 1,8 --context 32768,131072 --preset turbo4,turbo3 \
        --no-append --runs 30 --json-file "$OUT/skip_${v}_$r.json" >/dev/null 2>>"$OUT/pipes.err"
      echo "skip-merge $v round $r rc=$?"
    done
  done
  unset TQ_LAB_SKIP_MERGE
  git apply -R lab/cuda/skip_merge.patch
fi
echo "total $(( $(date +%s) - t0 )) s"
