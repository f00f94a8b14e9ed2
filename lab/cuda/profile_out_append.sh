#!/usr/bin/env bash
# Per-source-line executed instructions and stall samples of one prefill
# append launch (default: the -out presets' outlier_append_kernel, Llama,
# 131,072 tokens of turbo4-out from bf16): builds tq with -lineinfo (sm_90
# only), profiles launch $SKIP of kernel $KERNEL with ncu --set full, and
# folds the source page by CUDA line, per vector ($VECTORS, default 1M =
# 131,072 tokens x 8 KV heads). Carry build/gpu-deps. Output in $OUT.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
LB=/tmp/tq-lines-build
lab_build_lineinfo "$LB" || exit 1
echo "built $(( $(date +%s) - t0 )) s"
REP=/tmp/tq-out-append
rm -f "$REP.ncu-rep"
timeout 300 ncu --clock-control none --set full --import-source yes -k regex:"${KERNEL:-outlier_append_kernel}" \
  --launch-skip "${SKIP:-1}" --launch-count 1 -o "$REP" "$LB/tools/tq/tq" gpu-bench --shape "${SHAPE:-llama}" --batch 1 \
  --context 4096 --preset "${PRESET:-turbo4-out}" --runs 20 --append-runs 1 >"$OUT/out_ncu.log" 2>&1
echo "ncu rc=$?"
ncu -i "$REP.ncu-rep" --page source --csv --print-source cuda,sass >/tmp/out_src.csv 2>&1
ncu -i "$REP.ncu-rep" --page details --csv >"$OUT/out_details.csv" 2>&1
gzip -c /tmp/out_src.csv >"$OUT/out_source.csv.gz"
python3 - /tmp/out_src.csv "$OUT/out_lines.txt" "${VECTORS:-1048576}" <<'PY'
import csv, sys, collections, re
rows = list(csv.reader(open(sys.argv[1])))
nvec = float(sys.argv[3])
hdr = next(i for i, r in enumerate(rows) if "Source" in r and "Instructions Executed" in r)
h = rows[hdr]
si, ei = h.index("Source"), h.index("Instructions Executed")
sk = next((c for c in h if "Sampling (All" in c), None)
ski = h.index(sk) if sk else None
def val(s):
    try: return float(s.replace(",", ""))
    except ValueError: return None
inst = collections.Counter(); samp = collections.Counter(); cur = None
for r in rows[hdr + 1:]:
    if len(r) <= ei: continue
    is_sass = r[0].startswith("0x") or re.match(r"^\s*[0-9a-f]{4,}$", r[0] or "")
    if not is_sass and r[si].strip() and not re.match(r"^\s*@?!?U?P?\d?\s*[A-Z][A-Z0-9.]+\s", r[si]):
        cur = r[si].strip()[:120]; continue
    if cur is None: continue
    n = val(r[ei])
    if n: inst[cur] += n
    if ski is not None:
        s = val(r[ski])
        if s: samp[cur] += s
tot = sum(inst.values()); stot = sum(samp.values()) or 1
with open(sys.argv[2], "w") as f:
    f.write(f"warp instructions {tot:.0f}, per vector {tot / nvec:.1f}; samples {stot:.0f}\n")
    for line, n in inst.most_common(90):
        f.write(f"{n / nvec:8.2f}  {100 * samp[line] / stot:5.1f}%  {line}\n")
print(open(sys.argv[2]).read()[:12000])
PY
echo "total $(( $(date +%s) - t0 )) s"
