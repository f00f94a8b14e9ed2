"""Median of each (kernel, metric) in an `ncu --csv --print-units base` file.

Usage: python3 lab/cuda/ncu_summary.py FILE.csv [NAME_CHARS]
"""
import collections
import csv
import statistics
import sys

rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
width = int(sys.argv[2]) if len(sys.argv) > 2 else 60
if not rows:
    print("no ncu rows")
    sys.exit()
h = rows[0]
ki, mi, vi = h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value")
d = collections.defaultdict(list)
for r in rows[1:]:
    try:
        d[(r[ki].split("(")[0][-width:], r[mi])].append(float(r[vi].replace(",", "")))
    except ValueError:
        pass
for (k, m), v in sorted(d.items()):
    print(f"  {k:{width}s} {m:28s} n={len(v):3d} median={statistics.median(v):.5g}")
