#!/usr/bin/env bash
# One device call (after lab/cuda/ab_decode.sh, which leaves B's tq in
# /tmp/tq_B): GpuKvLayer::attend with f32 against bf16 / f16 query and
# output (`tq gpu-bench --io`), the same rows, $ROUNDS rounds alternating;
# prints the smaller round median of each and the ratio to f32. The 16-bit
# rows pay the query's widening kernel and write a 16-bit output.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROUNDS=${ROUNDS:-2}
TQ=${TQ:-/tmp/tq_B}
read -r -a ARGS <<<"${IO_ARGS:---shape llama,gemma --batch 1,8 --context 32768,131072 --preset turbo4 --no-append --runs 30}"
rm -rf /tmp/io && mkdir -p /tmp/io
for r in $(seq "$ROUNDS"); do
  for io in f32 bf16 f16; do
    timeout 200 "$TQ" gpu-bench "${ARGS[@]}" --io $io --json-file /tmp/io/${io}_$r.json >/dev/null 2>/tmp/io/${io}_$r.err ||
      { echo "$io round $r failed"; tail -3 /tmp/io/${io}_$r.err; }
  done
done
python3 - "$OUT/io.json" <<'PY'
import json, glob, sys, collections
t = collections.defaultdict(list)
raw = {}
for f in sorted(glob.glob("/tmp/io/*.json")):
    io = f.split("/")[-1].split("_")[0]
    rows = json.load(open(f))
    raw[f.split("/")[-1]] = rows
    for r in rows:
        if r.get("kind") == "attend" and r["preset"] != "dense_bf16":
            t[(r["shape"], r["preset"], r["batch"], r["context"], io)].append(r["ms"])
json.dump(raw, open(sys.argv[1], "w"))
print("shape  preset    batch context   f32 ms   bf16 ms  f16 ms   bf16/f32 f16/f32")
for k in sorted({k[:4] for k in t}):
    f, b, h = (min(t.get(k + (io,), [float("nan")])) for io in ("f32", "bf16", "f16"))
    print(f"{k[0]:6} {k[1]:9} {k[2]:5} {k[3]:7} {f:8.4f} {b:8.4f} {h:8.4f}   {b / f:6.3f} {h / f:6.3f}")
PY
echo "total $(( $(date +%s) - t0 )) s"
