#!/usr/bin/env bash
# One device call: A/B/C... of kernel variants. A is the tree as it is; each
# patch in $PATCHES (space-separated paths, git-ignored or committed) is one
# more variant, built as the tree + that patch alone (applied, built, reversed).
# All variants are built in one build directory (only the patched files
# recompile), test_cuda runs on A unless NO_TEST=1, then `tq gpu-bench
# $BENCH_ARGS` runs every variant in turn for $ROUNDS rounds; prints, per case,
# the smaller round median of each variant and its ratio to A (append rows:
# kernel times). NCU=1 adds lab/cuda/ncu_append.sh-style counters and stall
# reasons of each variant's first prefill-append launches ($NCU_SHAPE).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROUNDS=${ROUNDS:-3}
read -r -a ARGS <<<"${BENCH_ARGS:---shape llama --batch 1 --context 4096 --preset turbo4,paper_mse,turbo3 --runs 20 --append-runs 20}"
read -r -a PS <<<"${PATCHES:-}"
if [[ -n ${NO_TEST:-} ]]; then lab_configure && lab_build tq || exit 1
else lab_configure && lab_build tq test_cuda || exit 1; fi
cp "$B/tools/tq/tq" /tmp/tq_A
echo "A built at $(( $(date +%s) - t0 )) s"
[[ -n ${NO_TEST:-} ]] || lab_test_cuda
names=(A)
i=0
for p in "${PS[@]}"; do
  i=$((i + 1)); n=V$i; names+=("$n")
  patch -p1 <"$p" >/dev/null || { echo "$p does not apply"; exit 1; }
  lab_build tq || { patch -R -p1 <"$p"; exit 1; }
  cp "$B/tools/tq/tq" "/tmp/tq_$n"
  patch -R -p1 <"$p" >/dev/null
  sleep 1
  grep -E '^\+\+\+ b/' "$p" | sed 's|^+++ b/||' | xargs -r touch  # the next build recompiles them
  echo "$n ($p) built at $(( $(date +%s) - t0 )) s"
done
rm -rf /tmp/abm && mkdir -p /tmp/abm
for r in $(seq "$ROUNDS"); do
  for v in "${names[@]}"; do
    timeout 200 "/tmp/tq_$v" gpu-bench "${ARGS[@]}" --json-file "/tmp/abm/${v}_$r.json" >/dev/null 2>"/tmp/abm/${v}_$r.err" ||
      { echo "$v round $r failed"; tail -3 "/tmp/abm/${v}_$r.err"; }
  done
done
python3 - "$OUT/abm.json" "${names[@]}" <<'PY'
import json, glob, sys, collections
names = sys.argv[2:]
t = collections.defaultdict(list)
raw = {}
for f in sorted(glob.glob("/tmp/abm/*.json")):
    v = f.split("/")[-1].split("_")[0]
    rows = json.load(open(f))
    raw[f.split("/")[-1]] = rows
    for r in rows:
        if r.get("kind") == "attend":
            t[(r["shape"], r["preset"], str(r["batch"]), r["context"], v)].append(r["ms"])
        elif r.get("kind") == "append" and r.get("kernel_ms") is not None:
            t[(r["shape"], r["preset"] + "/" + r["input"], "append", r["tokens"], v)].append(r["kernel_ms"])
json.dump(raw, open(sys.argv[1], "w"))
print("shape  preset          batch context " + " ".join(f"{n:>9s}" for n in names) + "  " + " ".join(f"{n}/A" for n in names[1:]))
for k in sorted({k[:4] for k in t}):
    ms = [min(t.get(k + (n,), [float("nan")])) for n in names]
    print(f"{k[0]:6s} {k[1]:15s} {k[2]!s:>5} {k[3]:7d} " + " ".join(f"{m:9.4f}" for m in ms) + "  " +
          " ".join(f"{m / ms[0]:5.3f}" for m in ms[1:]))
PY
if [[ -n ${NCU:-} ]]; then
  metrics=smsp__inst_executed.sum,gpu__time_duration.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size
  metrics+=",regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
  for v in "${names[@]}"; do
    timeout 150 ncu --kernel-name regex:mse_append_kernel --launch-skip 2 --launch-count 2 --metrics "$metrics" \
      "/tmp/tq_$v" gpu-bench --shape "${NCU_SHAPE:-llama}" --batch 1 --context 4096 --preset turbo4 --runs 20 --append-runs 1 \
      >"$OUT/ncu_$v.txt" 2>&1
    echo "== ncu $v"; grep -E "mse_append_kernel<|inst_executed|time_duration|issue_active|registers|stalled_(no_inst|short|long|wait|barrier|mio|math)" "$OUT/ncu_$v.txt" |
      sed 's/  */ /g' | cut -c1-120 | head -12
  done
fi
echo "total $(( $(date +%s) - t0 )) s"
