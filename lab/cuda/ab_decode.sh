#!/usr/bin/env bash
# One device call: A/B of a change to the GPU decode path. B is the tree as
# it is; A is the tree with $PATCH (default lab/cuda/ab.patch, made by
# `git diff -- <files> > lab/cuda/ab.patch` before the call) reversed. Both
# are built in one build directory (only the patched files recompile),
# test_cuda runs on B (NO_TEST=1: not built, not run), then `tq gpu-bench` runs A and B alternately
# ($ROUNDS rounds; $BENCH_ARGS, default the Llama shape at batch 1 and 8 x
# 32K and 128K, turbo4 / paper_mse / turbo3, --no-append --runs 30). Prints
# the smaller round median of each case for A and B and their ratio; raw JSON
# in $OUT/ab.json (at most a few files: the device returns a limited number).
# Prefill-append rows (kernel times) are included when BENCH_ARGS has no --no-append.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PATCH=${PATCH:-lab/cuda/ab.patch}
ROUNDS=${ROUNDS:-2}
read -r -a ARGS <<<"${BENCH_ARGS:---shape llama --batch 1,8 --context 32768,131072 --preset turbo4,paper_mse,turbo3 --no-append --runs 30}"
[[ -s $PATCH ]] || { echo "no patch $PATCH"; exit 1; }
if [[ -n ${NO_TEST:-} ]]; then lab_configure && lab_build tq || exit 1  # B's tests ran in an earlier call
else lab_configure && lab_build tq test_cuda || exit 1; fi
cp "$B/tools/tq/tq" /tmp/tq_B
echo "B built at $(( $(date +%s) - t0 )) s"
[[ -n ${NO_TEST:-} ]] || lab_test_cuda
patch -R -p1 <"$PATCH" >/dev/null || { echo "patch -R failed"; exit 1; }
lab_build tq || { patch -p1 <"$PATCH"; exit 1; }
cp "$B/tools/tq/tq" /tmp/tq_A
patch -p1 <"$PATCH" >/dev/null
# The build directory now holds A's objects: make B's sources newer, so that a
# later build there (e.g. scripts/gpu_suite.sh in the same call or on the same
# warm machine) rebuilds B. Without this, one suite run benchmarked A's build.
sleep 1
grep -E '^\+\+\+ b/' "$PATCH" | sed 's|^+++ b/||' | xargs -r touch
echo "A built at $(( $(date +%s) - t0 )) s"
rm -rf /tmp/ab && mkdir -p /tmp/ab
# $BENCH_ARGS2 (optional): a second gpu-bench argument set per round (e.g. the
# prefill append of another shape alone, or another preset list).
read -r -a ARGS2 <<<"${BENCH_ARGS2:-}"
for r in $(seq "$ROUNDS"); do
  for v in A B; do
    timeout 200 /tmp/tq_$v gpu-bench "${ARGS[@]}" --json-file /tmp/ab/${v}_$r.json >/dev/null 2>/tmp/ab/${v}_$r.err ||
      { echo "$v round $r failed"; tail -3 /tmp/ab/${v}_$r.err; }
    [[ ${#ARGS2[@]} -eq 0 ]] || timeout 200 /tmp/tq_$v gpu-bench "${ARGS2[@]}" --json-file /tmp/ab/${v}_${r}b.json \
      >/dev/null 2>/tmp/ab/${v}_${r}b.err || { echo "$v round $r (BENCH_ARGS2) failed"; tail -3 /tmp/ab/${v}_${r}b.err; }
  done
done
python3 lab/cuda/variant_table.py /tmp/ab "$OUT/ab.json" A B
echo "total $(( $(date +%s) - t0 )) s"
