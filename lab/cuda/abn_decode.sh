#!/usr/bin/env bash
# One device call: several variants of the GPU decode path against the tree
# as it is (the base). VARIANTS="name=patch ..." (patches against the tree,
# applied one at a time); each variant is built (tq, and test_cuda unless
# NO_TEST=1, run on it), then `tq gpu-bench` runs the base and every variant
# in turn, $ROUNDS rounds ($BENCH_ARGS, and $BENCH_ARGS2 if set, as in
# ab_decode.sh). Prints the smaller round median of each case and each
# variant's ratio to the base (prefill-append rows too, kernel times, when
# BENCH_ARGS has no --no-append); raw JSON in $OUT/abn.json. NCU=1 adds, per
# variant, ncu's executed instructions, issue share and stall reasons of two
# prefill-append launches ($NCU_SHAPE, default llama; turbo4 from bf16;
# NCU_KERNEL / NCU_PRESET / NCU_SKIP / NCU_COUNT / NCU_LINES pick others).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROUNDS=${ROUNDS:-2}
read -r -a ARGS <<<"${BENCH_ARGS:---shape llama --batch 1,8 --context 32768,131072 --preset turbo4,paper_mse,turbo3 --no-append --runs 30}"
read -r -a ARGS2 <<<"${BENCH_ARGS2:-}"
names=(base)
lab_configure && lab_build tq || exit 1
cp "$B/tools/tq/tq" /tmp/tq_base
for v in ${VARIANTS:?VARIANTS=\"name=patch ...\"}; do
  name=${v%%=*} patch=${v#*=}
  patch -p1 <"$patch" >/dev/null || { echo "$name: patch failed"; exit 1; }
  if [[ -n ${NO_TEST:-} ]]; then lab_build tq; else lab_build tq test_cuda; fi || { patch -R -p1 <"$patch"; exit 1; }
  cp "$B/tools/tq/tq" "/tmp/tq_$name"
  if [[ -z ${NO_TEST:-} ]]; then echo -n "$name: "; lab_test_cuda; cp "$OUT/test_cuda.log" "$OUT/test_cuda_$name.log"; fi
  patch -R -p1 <"$patch" >/dev/null
  sleep 1
  grep -E '^\+\+\+ b/' "$patch" | sed 's|^+++ b/||' | xargs -r touch  # the next build recompiles them
  names+=("$name")
  echo "$name built at $(( $(date +%s) - t0 )) s"
done
rm -f "$OUT/test_cuda.log"
rm -rf /tmp/abn && mkdir -p /tmp/abn
for r in $(seq "$ROUNDS"); do
  for v in "${names[@]}"; do
    timeout 200 /tmp/tq_$v gpu-bench "${ARGS[@]}" --json-file /tmp/abn/${v}_$r.json >/dev/null 2>/tmp/abn/${v}_$r.err ||
      { echo "$v round $r failed"; tail -3 /tmp/abn/${v}_$r.err; }
    [[ ${#ARGS2[@]} -eq 0 ]] || timeout 200 /tmp/tq_$v gpu-bench "${ARGS2[@]}" --json-file /tmp/abn/${v}_${r}b.json \
      >/dev/null 2>/tmp/abn/${v}_${r}b.err || { echo "$v round $r (BENCH_ARGS2) failed"; tail -3 /tmp/abn/${v}_${r}b.err; }
  done
done
python3 lab/cuda/variant_table.py /tmp/abn "$OUT/abn.json" "${names[@]}"
if [[ -n ${NCU:-} ]]; then
  metrics=smsp__inst_executed.sum,gpu__time_duration.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size
  metrics+=",regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
  for v in "${names[@]}"; do
    timeout 150 ncu --kernel-name regex:"${NCU_KERNEL:-mse_append_kernel}" --launch-skip "${NCU_SKIP:-2}" \
      --launch-count "${NCU_COUNT:-2}" --metrics "$metrics" \
      "/tmp/tq_$v" gpu-bench --shape "${NCU_SHAPE:-llama}" --batch 1 --context 4096 --preset "${NCU_PRESET:-turbo4}" \
      --runs 20 --append-runs 1 >"$OUT/ncu_$v.txt" 2>&1
    echo "== ncu $v"; grep -E "${NCU_KERNEL:-mse_append_kernel}.*<|inst_executed|time_duration|issue_active|registers|stalled_(no_inst|short|long|wait|barrier|mio|math|not_sel)" "$OUT/ncu_$v.txt" |
      sed 's/  */ /g' | cut -c1-120 | head -${NCU_LINES:-12}
  done
fi
echo "total $(( $(date +%s) - t0 )) s"
