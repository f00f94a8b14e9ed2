#!/usr/bin/env bash
# One device call: decode attention under sustained load, ours against
# PyTorch SDPA. `tq gpu-bench` and scripts/sdpa_bench.py time medians of
# a few dozen launches (bursts); a decoding server runs them back to back for
# seconds, where the board's 700 W cap can lower the SM clock. Here both run
# $RUNS launches of one case (L2 flushed before each, as always) while
# nvidia-smi samples clocks and power every 20 ms; printed: median ms at 30
# launches and at $RUNS, and the clock / power / throttle of the last second
# of each sustained run. Carry build/gpu-deps.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RUNS=${RUNS:-4000}
BATCH=${BATCH:-8}
CTX=${CTX:-131072}
lab_configure && lab_build tq || exit 1
echo "built at $(( $(date +%s) - t0 )) s"
sample() {  # sample NAME CMD...: runs CMD with nvidia-smi sampling into /tmp/smi_NAME.csv
  local name=$1; shift
  nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv,noheader,nounits \
    -lms 20 >/tmp/smi_$name.csv 2>/dev/null &
  local sp=$!
  "$@" >/tmp/log_$name.txt 2>&1 || { echo "$name failed"; tail -3 /tmp/log_$name.txt; }
  kill $sp; wait $sp 2>/dev/null
  cp /tmp/smi_$name.csv "$OUT/"
}
for n in 30 "$RUNS"; do
  sample sdpa_$n python3 scripts/sdpa_bench.py --shape llama --batch "$BATCH" --context "$CTX" --backends cudnn,flash \
    --runs $((n < 50 ? 50 : n)) --out /tmp/sdpa_$n.json
  sample tq_$n "$B/tools/tq/tq" gpu-bench --shape llama --batch "$BATCH" --context "$CTX" --preset turbo4,paper_mse,turbo3 \
    --no-append --runs "$n" --json-file /tmp/tq_$n.json
done
python3 - "$RUNS" <<'PY'
import json, sys
R = sys.argv[1]
def smi(name):  # the last 50 samples before the run ended (1 s)
    rows = [[x.strip() for x in l.split(",")] for l in open(f"/tmp/smi_{name}.csv") if l.strip()]
    busy = [r for r in rows if float(r[1]) > 300][-50:]
    if not busy: return "no busy samples"
    c = sorted(float(r[0]) for r in busy); p = sorted(float(r[1]) for r in busy)
    thr = sum(r[2] != "0x0000000000000000" for r in busy)
    return f"sm {c[len(c)//2]:.0f} MHz, {p[len(p)//2]:.0f} W, throttled {thr}/{len(busy)}"
for n in ("30", R):
    s = json.load(open(f"/tmp/sdpa_{n}.json"))
    best = min((r for r in s["results"] if "ms" in r), key=lambda r: r["ms"])
    print(f"runs {n:>5}: SDPA {best['backend']} {best['ms']:.4f} ms  [{smi('sdpa_' + n)}]")
    rows = [r for r in json.load(open(f"/tmp/tq_{n}.json")) if r.get("kind") == "attend"]
    for r in rows:
        print(f"            {r['preset']:10s} {r['ms']:.4f} ms  x SDPA {best['ms'] / r['ms']:.2f}")
    print(f"            [tq run, last second: {smi('tq_' + n)}]")
PY
echo "total $(( $(date +%s) - t0 )) s"
