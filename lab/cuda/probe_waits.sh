#!/usr/bin/env bash
# One device call: how long the decode kernel's warps wait for their copies
# (lab/cuda/wait_probe.patch: clock64 around each mbarrier wait, the pair
# loops and the whole kernel, per warp; printed for the 26th launch of each
# case). Tests the thirteenth session's reading of probe_overlap.sh: at
# 8 x 128K turbo4 copies alone take 84 % and compute alone 83 % of the full
# time, so the full kernel should wait ~15 % of its loop for data if too few
# bytes are in flight (then a deeper pipeline is the lever); if it does not
# wait, the loss is elsewhere (clock, shared-memory contention, the
# producer's own issue: its cycles are counted too). The same probe is built
# a second time with TQ_LAB_MODE 2 (compute only: no copies, no waits, zeroed
# stages) so that the loop cycles a pair of the two builds compare directly.
# $MODES picks the builds (default "0 2"; 1 = copies and waits only, in
# wait_probe2.patch), $WAIT_PATCH another probe patch (wait_probe2.patch
# splits the issue; producer_warp_probe.patch probes that experiment),
# $PRESETS and $CASES narrow the runs. Carry build/gpu-deps.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
WAIT_PATCH=${WAIT_PATCH:-lab/cuda/wait_probe.patch}
git apply "$WAIT_PATCH" || { echo "$WAIT_PATCH does not apply"; exit 1; }
lab_configure || exit 1
for m in ${MODES:-0 2}; do
  lab_build_mode $m /tmp/tq_wait$m || exit 1
done
echo "built at $(( $(date +%s) - t0 )) s"
for pr in ${PRESETS:-turbo4 paper_mse turbo3}; do
  for bc in ${CASES:-1x32768 1x131072 8x32768 8x131072}; do
    for m in ${MODES:-0 2}; do
      echo -n "$pr $bc mode $m: "
      TQ_LAB_DUMP=1 timeout 120 /tmp/tq_wait$m gpu-bench --shape llama --batch "${bc%x*}" --context "${bc#*x}" \
        --preset "$pr" --no-append --runs 30 2>&1 | grep -E "^LAB|^llama .* $pr " | tr '\n' ' '
      echo
    done
  done
done
git checkout -q -- src
echo "total $(( $(date +%s) - t0 )) s"
