#!/usr/bin/env bash
# One device call: A/B of a change to the GPU decode path. B is the tree as
# it is; A is the tree with $PATCH (default lab/cuda/ab.patch, made by
# `git diff -- <files> > lab/cuda/ab.patch` before the call) reversed. Both
# are built in one build directory (only the patched files recompile),
# test_cuda runs on B, then `tq gpu-bench` runs A and B alternately
# ($ROUNDS rounds; $BENCH_ARGS, default the Llama shape at batch 1 and 8 x
# 32K and 128K, turbo4 / paper_mse / turbo3, --no-append --runs 30). Prints
# the smaller round median of each case for A and B and their ratio; raw JSON
# in $OUT/ab.json (at most a few files: the device returns a limited number).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PATCH=${PATCH:-lab/cuda/ab.patch}
ROUNDS=${ROUNDS:-2}
read -r -a ARGS <<<"${BENCH_ARGS:---shape llama --batch 1,8 --context 32768,131072 --preset turbo4,paper_mse,turbo3 --no-append --runs 30}"
[[ -s $PATCH ]] || { echo "no patch $PATCH"; exit 1; }
lab_configure && lab_build tq test_cuda || exit 1
cp "$B/tools/tq/tq" /tmp/tq_B
echo "B built at $(( $(date +%s) - t0 )) s"
lab_test_cuda
patch -R -p1 <"$PATCH" >/dev/null || { echo "patch -R failed"; exit 1; }
lab_build tq || { patch -p1 <"$PATCH"; exit 1; }
cp "$B/tools/tq/tq" /tmp/tq_A
patch -p1 <"$PATCH" >/dev/null
echo "A built at $(( $(date +%s) - t0 )) s"
rm -rf /tmp/ab && mkdir -p /tmp/ab
for r in $(seq "$ROUNDS"); do
  for v in A B; do
    timeout 200 /tmp/tq_$v gpu-bench "${ARGS[@]}" --json-file /tmp/ab/${v}_$r.json >/dev/null 2>/tmp/ab/${v}_$r.err ||
      { echo "$v round $r failed"; tail -3 /tmp/ab/${v}_$r.err; }
  done
done
python3 - "$OUT/ab.json" <<'PY'
import json, glob, sys, collections
t = collections.defaultdict(list)
raw = {}
for f in sorted(glob.glob("/tmp/ab/*.json")):
    v = f.split("/")[-1].split("_")[0]
    rows = json.load(open(f))
    raw[f.split("/")[-1]] = rows
    for r in rows:
        if r.get("kind") == "attend":
            t[(r["shape"], r["preset"], r["batch"], r["context"], v)].append(r["ms"])
json.dump(raw, open(sys.argv[1], "w"))
print("shape  preset      batch context    A ms      B ms    B/A")
for k in sorted({k[:4] for k in t}):
    a, b = min(t.get(k + ("A",), [float("nan")])), min(t.get(k + ("B",), [float("nan")]))
    print(f"{k[0]:6s} {k[1]:10s} {k[2]:5d} {k[3]:7d}  {a:8.4f}  {b:8.4f}  {b / a:5.3f}")
PY
echo "total $(( $(date +%s) - t0 )) s"
