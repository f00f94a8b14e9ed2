"""Round files of `tq gpu-bench --json-file DIR/<variant>_<round>[b].json` ->
the smallest round median of each case and variant, and each variant's ratio
to the first. Attend rows by (shape, preset, batch, context); prefill-append
rows by their kernel time (batch 'append', context = tokens). All rows go to
OUT_JSON as they came.

  python3 lab/cuda/variant_table.py DIR OUT_JSON VARIANT [VARIANT ...]
"""
import collections
import glob
import json
import sys

src, out, variants = sys.argv[1], sys.argv[2], sys.argv[3:]
t = collections.defaultdict(list)
raw = {}
for f in sorted(glob.glob(f"{src}/*.json")):
    name = f.split("/")[-1]
    v = name.rsplit("_", 1)[0]
    rows = json.load(open(f))
    raw[name] = rows
    for r in rows:
        if r.get("kind") == "attend":
            t[(r["shape"], r["preset"], str(r["batch"]), r["context"], v)].append(r["ms"])
        elif r.get("kind") == "append" and r.get("kernel_ms") is not None:
            t[(r["shape"], r["preset"] + "/" + r["input"], "append", r["tokens"], v)].append(r["kernel_ms"])
json.dump(raw, open(out, "w"))
print("shape  preset      batch context " + "".join(f"{v + ' ms':>10}" for v in variants) +
      "".join(f"{v + '/' + variants[0]:>10}" for v in variants[1:]))
for k in sorted({k[:4] for k in t}):
    ms = [min(t.get(k + (v,), [float("nan")])) for v in variants]
    print(f"{k[0]:6s} {k[1]:10s} {k[2]!s:>5} {k[3]:7d} " + "".join(f"{m:10.4f}" for m in ms) +
          "".join(f"{m / ms[0]:10.3f}" for m in ms[1:]))
