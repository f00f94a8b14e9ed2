#!/usr/bin/env bash
# One device call: the SM clock and board power while the decode kernel runs
# as is (TQ_LAB_MODE 0), copies only (1) and compute only (2)
# (lab/cuda/lab_mode.patch): does the full kernel run at a lower clock than
# its compute alone, i.e. is the gap between them power, not code?
# nvidia-smi samples every 20 ms during a long `tq gpu-bench` of one case
# ($BENCH_ARGS); prints the median SM clock, power, and the kernel time.
# Carry build/gpu-deps.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
read -r -a ARGS <<<"${BENCH_ARGS:---shape llama --batch 8 --context 131072 --preset turbo4,turbo3 --no-append --runs 4000}"
git apply lab/cuda/lab_mode.patch || { echo "lab_mode.patch does not apply"; exit 1; }
F=src/cuda/decode_attention_tc.cu
lab_configure || exit 1
for m in 0 1 2; do
  lab_build_mode $m /tmp/tq_mode$m || exit 1
done
git checkout -q -- $F
echo "built at $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=clocks.max.sm,clocks.max.mem,power.limit,enforced.power.limit --format=csv
for m in 0 1 2 0; do
  for pr in ${PRESETS:-turbo4 turbo3}; do
    a=("${ARGS[@]}"); for i in "${!a[@]}"; do [[ ${a[$i]} == --preset ]] && a[$((i + 1))]=$pr; done
    nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
      --format=csv,noheader,nounits -lms 20 >/tmp/smi_$m.csv 2>/dev/null &
    sp=$!
    /tmp/tq_mode$m gpu-bench "${a[@]}" --json-file /tmp/clk_$m.json >/dev/null 2>&1
    kill $sp; wait $sp 2>/dev/null
    cp /tmp/smi_$m.csv "$OUT/smi_${m}_$pr.csv"
    python3 - "$m" "$pr" <<'PY'
import sys, json, collections
m, pr = sys.argv[1], sys.argv[2]
rows = [[x.strip() for x in l.split(",")] for l in open(f"/tmp/smi_{m}.csv") if l.strip()]
ms = {r["preset"]: r["ms"] for r in json.load(open(f"/tmp/clk_{m}.json")) if r.get("kind") == "attend"}
clk = collections.Counter(int(float(r[0])) // 15 * 15 for r in rows)
thr = collections.Counter(r[4] for r in rows)
pw = sorted(float(r[2]) for r in rows)
q = lambda f: pw[min(len(pw) - 1, int(f * len(pw)))]
print(f"mode {m} {pr}: kernel {ms.get(pr, float('nan')):.4f} ms (dense {ms.get('dense_bf16', float('nan')):.4f}); {len(rows)} samples; "
      f"power W p50 {q(0.5):.0f} p90 {q(0.9):.0f} max {pw[-1]:.0f}; sm MHz {sorted(clk.items())}; throttle {dict(thr)}")
PY
  done
done
echo "total $(( $(date +%s) - t0 )) s"
