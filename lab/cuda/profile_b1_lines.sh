#!/usr/bin/env bash
# Where the warps of the decode kernel wait at batch 1 (docs/kernel-notes.md,
# twenty-first session): builds tq with -lineinfo (sm_90 only), profiles one
# decode_tc launch of Llama turbo4 at 1 x CONTEXT (default 4096: one tile a
# warp, so the launch is mostly prologue and combine) with ncu --set full,
# and folds the PC-sampling stall samples of the source page by CUDA line.
# Carry build/gpu-deps. Output in $OUT.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
LB=/tmp/tq-lines-build
lab_build_lineinfo "$LB" || exit 1
echo "built $(( $(date +%s) - t0 )) s"
for CTX in ${CONTEXTS:-4096 32768}; do
  REP=/tmp/tq-b1-$CTX
  rm -f "$REP.ncu-rep"
  timeout 200 ncu --clock-control none --set full --import-source yes -k regex:decode_tc_kernel \
    --launch-skip 3 --launch-count 1 -o "$REP" "$LB/tools/tq/tq" gpu-bench --shape llama --batch 1 \
    --context $CTX --preset "${PRESET:-turbo4}" --runs 20 --no-append >"$OUT/b1_ncu_$CTX.log" 2>&1
  echo "ncu $CTX rc=$?"
  ncu -i "$REP.ncu-rep" --page source --csv --print-source cuda,sass >/tmp/b1_$CTX.csv 2>&1
  ncu -i "$REP.ncu-rep" --page details --csv >"$OUT/b1_details_$CTX.csv" 2>&1
  gzip -c /tmp/b1_$CTX.csv >"$OUT/b1_source_$CTX.csv.gz"
  python3 - /tmp/b1_$CTX.csv "$OUT/b1_lines_$CTX.txt" <<'PY'
import csv, sys, collections, re
rows = list(csv.reader(open(sys.argv[1])))
hdr = next(i for i, r in enumerate(rows) if "Source" in r and any("Sampling" in c for c in r))
h = rows[hdr]
si = h.index("Source")
num = [i for i, c in enumerate(h) if i != si and c not in ("Address", "#")]
def val(s):
    try: return float(s.replace(",", ""))
    except ValueError: return None
per = collections.defaultdict(lambda: collections.Counter()); cur = None; order = []
for r in rows[hdr + 1:]:
    if len(r) <= si: continue
    is_sass = r[0].startswith("0x") or re.match(r"^\s*[0-9a-f]{4,}$", r[0] or "")
    if not is_sass and r[si].strip() and not re.match(r"^\s*@?!?U?P?\d?\s*[A-Z][A-Z0-9.]+\s", r[si]):
        cur = r[si].strip()[:120]
        if cur not in per: order.append(cur)
        continue
    if cur is None: continue
    for i in num:
        v = val(r[i]) if i < len(r) else None
        if v is not None: per[cur][h[i]] += v
key = next(c for c in h if "Sampling (All" in c)
tot = sum(c[key] for c in per.values()) or 1
stall_cols = [c for c in h if c.startswith(("stall_", "smsp__pcsamp")) or "Stall" in c]
with open(sys.argv[2], "w") as f:
    f.write("columns: " + " | ".join(h) + "\n")
    f.write(f"total samples ({key}): {tot:.0f}\n")
    for line, c in sorted(per.items(), key=lambda kv: -kv[1][key])[:70]:
        extra = ", ".join(f"{k}={c[k]:.0f}" for k in sorted(stall_cols, key=lambda k: -c[k])[:3] if c[k] > 0)
        f.write(f"{100*c[key]/tot:6.2f}%  {c[key]:8.0f}  {line}   [{extra}]\n")
print(open(sys.argv[2]).read()[:9000])
PY
done
echo "total $(( $(date +%s) - t0 )) s"
