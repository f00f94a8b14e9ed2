#!/usr/bin/env bash
# After lab/cuda/ab_decode.sh in the same device call (it leaves /tmp/tq_A and
# /tmp/tq_B): ncu of the first prefill-append launches of each binary
# (executed warp instructions, duration, issue-active share, registers) for a
# 131,072-token append of $NCU_SHAPE (default llama), turbo4. Output in
# $OUT/ncu_append_{A,B}.txt, a summary on stdout. NCU_STALLS=1 adds the
# warp-state section (stall reasons, cycles per issued instruction).
OUT=${OUT:-./gpu-out}
for v in A B; do
  metrics=smsp__inst_executed.sum,gpu__time_duration.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size
  [[ -z ${NCU_STALLS:-} ]] || metrics+=",regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
  timeout 150 ncu --kernel-name regex:mse_append_kernel --launch-count 6 --metrics "$metrics" \
    /tmp/tq_$v gpu-bench --shape "${NCU_SHAPE:-llama}" --batch 1 --context 4096 --preset turbo4 --runs 20 --append-runs 1 \
    >"$OUT/ncu_append_$v.txt" 2>&1
  grep -E "mse_append_kernel|inst_executed|time_duration|issue_active|registers|stalled" "$OUT/ncu_append_$v.txt" |
    sed 's/  */ /g' | cut -c1-160 | head -150
done
