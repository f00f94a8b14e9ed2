#!/usr/bin/env bash
# One device call: how much of the decode kernel's time is the copy
# pipeline and how much is the tile compute. Builds tq three times from
# lab/cuda/lab_mode.patch (TQ_LAB_MODE 0 = the kernel as on main, 1 = copies
# and waits only, no tile compute, 2 = tile compute only on zeroed stages, no
# copies) and runs `tq gpu-bench` on each, alternately, $ROUNDS rounds
# ($BENCH_ARGS as in ab_decode.sh). Prints the smaller round median per
# case and mode, with the row's read floor. Outputs are wrong in modes 1-2:
# timing only. $VARIANTS (default "main"): space-separated patches applied
# to the tree before lab_mode.patch ("main" = none), each built in all three
# modes and benchmarked in the same rounds. Carry build/gpu-deps.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROUNDS=${ROUNDS:-2}
read -r -a ARGS <<<"${BENCH_ARGS:---shape llama --batch 1,8 --context 32768,131072 --preset turbo4,paper_mse,turbo3 --no-append --runs 30}"
read -r -a VARS <<<"${VARIANTS:-main}"
lab_configure || exit 1
BINS=()
for vi in "${!VARS[@]}"; do
  git checkout -q -- src include tests tools 2>/dev/null
  v=${VARS[$vi]}
  if [[ $v != main ]]; then git apply "$v" || { echo "$v does not apply"; exit 1; }; fi
  git apply lab/cuda/lab_mode.patch || { echo "lab_mode.patch does not apply on $v"; exit 1; }
  for m in 0 1 2; do
    lab_build_mode $m /tmp/tq_v${vi}m$m || exit 1
    BINS+=("v${vi}m$m")
    echo "variant $vi ($v) mode $m built at $(( $(date +%s) - t0 )) s"
  done
done
git checkout -q -- src include tests tools 2>/dev/null
rm -rf /tmp/po && mkdir -p /tmp/po
for r in $(seq "$ROUNDS"); do
  for b in "${BINS[@]}"; do
    timeout 200 /tmp/tq_$b gpu-bench "${ARGS[@]}" --json-file /tmp/po/${b}_$r.json >/dev/null 2>/tmp/po/${b}_$r.err ||
      { echo "$b round $r failed"; tail -3 /tmp/po/${b}_$r.err; }
  done
done
python3 - "$OUT/probe_overlap.json" "${VARS[@]}" <<'PY'
import json, glob, sys, collections
t = collections.defaultdict(list); floor = {}; raw = {}
for f in sorted(glob.glob("/tmp/po/*.json")):
    m = f.split("/")[-1].split("_")[0]
    rows = json.load(open(f)); raw[f.split("/")[-1]] = rows
    for r in rows:
        if r.get("kind") != "attend": continue
        k = (r["shape"], r["preset"], r["batch"], r["context"])
        t[k + (m,)].append(r["ms"])
        if r.get("read_floor_ms"): floor[k] = min(floor.get(k, 1e9), r["read_floor_ms"])
json.dump(raw, open(sys.argv[1], "w"))
vars_ = sys.argv[2:]
for vi, v in enumerate(vars_):
    print(f"variant v{vi}: {v}")
print("shape  preset     batch context variant  full ms  copy-only  compute-only  floor   copy/full compute/full")
for k in sorted({k[:4] for k in t}):
    for vi in range(len(vars_)):
        a, b, c = (min(t.get(k + (f"v{vi}m{m}",), [float("nan")])) for m in "012")
        fl = floor.get(k, float("nan"))
        print(f"{k[0]:6s} {k[1]:10s} {k[2]:5d} {k[3]:7d}  v{vi}  {a:7.4f}  {b:9.4f}  {c:12.4f}  {fl:6.4f}  {b/a:8.3f} {c/a:8.3f}")
PY
echo "total $(( $(date +%s) - t0 )) s"
