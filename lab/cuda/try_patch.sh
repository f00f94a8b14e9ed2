#!/usr/bin/env bash
# One device call for a prepared kernel patch: apply $PATCH (default
# lab/cuda/aligned_layout.patch) to the tree, run the quick GPU suite on the
# result (build, GPU tests, sanitizers, SDPA, gpu-bench; $TQ_SUITE_BUDGET
# seconds, default 300), and only if every step passed, A/B it against the
# unpatched tree (lab/cuda/ab_decode.sh with NO_TEST=1: the suite ran the
# tests; $BENCH_ARGS / $ROUNDS as there). Carry build/gpu-deps and
# build/gtest-src; ~8-9 min on a cold H200 machine. Everything lands in $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
PATCH=${PATCH:-lab/cuda/aligned_layout.patch}
git apply "$PATCH" || { echo "try_patch.sh: $PATCH does not apply to this tree"; exit 1; }
cp "$PATCH" lab/cuda/ab.patch
TQ_CUDA_ARCHS=90-real TQ_SUITE_BUDGET=${TQ_SUITE_BUDGET:-300} bash scripts/gpu_suite.sh --quick >"${OUT:-./gpu-out}/suite_stdout.txt" 2>&1
rc=$?
tail -4 "${OUT:-./gpu-out}/suite_stdout.txt"
((rc == 0)) || { echo "try_patch.sh: the suite failed on the patched tree (rc $rc); no A/B"; exit 1; }
NO_TEST=1 bash lab/cuda/ab_decode.sh
