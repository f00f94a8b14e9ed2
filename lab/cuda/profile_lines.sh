#!/usr/bin/env bash
# Per-source-line instruction counts of one tensor-core decode launch (Llama
# 8 x 32K turbo4): builds tq with -lineinfo (sm_90 only), profiles one launch
# with ncu --set full, and folds the SASS page by CUDA source line.
# Carry build/gpu-deps. Output in $OUT (default ./probe-out).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/probe-out}
mkdir -p "$OUT"
B=/tmp/tq-lines-build
cmake -S "$ROOT" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQ_CUDA=ON -DTQ_BUILD_TESTS=OFF \
  -DTQ_BUILD_TOOLS=ON -DTQ_BUILD_BENCH=OFF -DTQ_CUDA_ARCHS=90-real -DCMAKE_CUDA_FLAGS=-lineinfo \
  "-DCMAKE_PREFIX_PATH=$ROOT/build/gpu-deps" >"$OUT/lines_build.log" 2>&1 &&
  cmake --build "$B" -j 16 --target tq >>"$OUT/lines_build.log" 2>&1 || { tail -30 "$OUT/lines_build.log"; exit 1; }
REP=/tmp/tq-lines
rm -f "$REP.ncu-rep"
timeout 240 ncu --clock-control none --set full --import-source yes -k regex:decode_tc_kernel \
  --launch-skip 3 --launch-count 1 -o "$REP" "$B/tools/tq/tq" gpu-bench --shape llama --batch 8 \
  --context 32768 --preset "${PRESET:-turbo4}" --runs 20 --no-append >"$OUT/lines_ncu.log" 2>&1
echo "ncu rc=$?"
ncu -i "$REP.ncu-rep" --page source --csv --print-source cuda,sass >/tmp/lines.csv 2>&1
python3 - /tmp/lines.csv "$OUT/lines.txt" <<'PY'
import csv, sys, collections, re
rows = list(csv.reader(open(sys.argv[1])))
hdr = None
for i, r in enumerate(rows):
    if "Source" in r and "Instructions Executed" in r:
        hdr = i; break
h = rows[hdr]; si = h.index("Source"); ei = h.index("Instructions Executed")
per_line = collections.Counter(); text = {}; cur = None; total = 0
for r in rows[hdr + 1:]:
    if len(r) <= ei: continue
    src = r[si]
    m = re.match(r"^\s*(\S+\.(?:cu|cuh|hpp|h)):(\d+)", src) if src else None
    # cuda,sass interleaving: source rows have no address; remember the line
    try: n = int(r[ei].replace(",", ""))
    except ValueError: n = None
    if r[0] and not r[0].startswith("0x") and n is not None and not src.strip().startswith(("@", "LD", "ST")):
        cur = src.strip()[:110]; continue
    if n is not None and cur is not None:
        per_line[cur] += n; total += n
with open(sys.argv[2], "w") as f:
    f.write(f"total {total}, per tile (131072 tiles) {total/131072:.1f}\n")
    for k, v in per_line.most_common(120):
        f.write(f"{v/131072:7.2f}  {k}\n")
print(open(sys.argv[2]).read()[:6000])
PY
cp /tmp/lines.csv "$OUT/lines.csv"
