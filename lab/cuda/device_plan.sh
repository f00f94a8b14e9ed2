#!/usr/bin/env bash
# Device-planned splits (twenty-seventh session): build, test_cuda (with the
# new plan tests), memcheck / racecheck of them, and gpu-bench's captured
# attends (graph_ms: device plan at each replay; graph_frozen_plan_ms: the
# host plan frozen at capture before the fill; device_plan_ms: the device
# plan outside a graph) for turbo4 / turbo3 at batch 1 and 8 (SHAPES, BATCHES,
# CONTEXTS, PRESETS; SKIP_TESTS=1; REPEAT=n runs the bench n times).
source "$(dirname "$0")/common.sh"
lab_configure && lab_build tq test_cuda || exit 1
echo "build $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
lab_test_cuda
NEW='CudaPlan.*:CudaAttentionTc.DevicePlanIsTheHostPlan:CudaGraph.CapturedAttendReplansAsSequencesGrow:CudaGraph.CapturedAttendStaysExactAsSequencesGrow'
grep -E "captured attend: split" "$OUT/test_cuda.log"
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/tests/test_cuda" --gtest_filter="$NEW" >"$OUT/memcheck.log" 2>&1
echo "memcheck rc=$? $(grep -E 'ERROR SUMMARY|PASSED|FAILED' "$OUT/memcheck.log" | tr '\n' ' ')"
timeout 150 compute-sanitizer --tool racecheck --error-exitcode 9 "$B/tests/test_cuda" --gtest_filter='CudaGraph.CapturedAttendReplansAsSequencesGrow' >"$OUT/racecheck.log" 2>&1
echo "racecheck rc=$? $(grep -E 'RACECHECK SUMMARY|PASSED|FAILED' "$OUT/racecheck.log" | tr '\n' ' ')"
echo "tests done $(( $(date +%s) - t0 )) s"
fi
for rep in $(seq 1 ${REPEAT:-1}); do
  timeout 240 "$B/tools/tq/tq" gpu-bench --shape ${SHAPES:-llama,gemma} --batch ${BATCHES:-1,8} --context ${CONTEXTS:-32768,131072} \
  --preset ${PRESETS:-turbo4,turbo3} --no-append --json-file "$OUT/bench.json" >"$OUT/bench.txt" 2>&1
echo "bench rc=$?"; grep -v "dense_bf16" "$OUT/bench.txt" | grep -E "graph" | tail -20
done
echo "total $(( $(date +%s) - t0 )) s"
