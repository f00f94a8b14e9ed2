#!/usr/bin/env python3
"""PyTorch's dense decode attention, the outside baseline of `tq gpu-bench` (issue 5).

torch.nn.functional.scaled_dot_product_attention, bf16, one query token per
sequence, one layer of Llama-3-8B (Hq 32, Hkv 8, d 128) or Gemma-3 (Hq 4,
Hkv 1, d 256), every backend that runs (flash, cuDNN, efficient, math, each
forced with torch.nn.attention.sdpa_kernel). GQA natively (enable_gqa=True);
a backend that refuses it is tried on K/V expanded with repeat_interleave
(marked "gqa": "repeat": that kernel reads g times the bytes, the TB/s column
still counts the K/V a GQA kernel needs). Median of --runs launches between
CUDA events, the L2 flushed before each; TB/s = (K + V + q bytes) / time, as
tq gpu-bench counts it. The flush is a READ of a buffer of max(256 MiB, 4x L2)
(a sum over it into a tiny result), as tq gpu-bench's L2Flusher does: L2 then
holds clean lines only, so no write-back of dirty lines falls inside the timed
region (a fill_/memset flush leaves L2 dirty and the next kernel pays for it).

Writes JSON: {"device", "torch", "copy_tb_s", "runs", "results": [...],
"best": [fastest row per (shape, batch, context)]}; each row has shape,
batch, context, backend, ms, tb_s (or "error" when the backend failed).

    python3 scripts/sdpa_bench.py --out sdpa.json            # the full grid
    python3 scripts/sdpa_bench.py --quick --out sdpa.json    # fewer shapes
    tq gpu-bench --sdpa sdpa.json                            # adds speedup_vs_sdpa
"""
import argparse
import json
import os
import statistics
import sys
import warnings

SHAPES = {"llama": (32, 8, 128), "gemma": (4, 1, 256)}  # n_heads_q, n_heads_kv, head_dim
MAX_REPEAT_BYTES = 24 << 30  # skip the repeat_interleave fallback above this


def die(msg):
    print(f"sdpa_bench.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def int_list(flag, s):
    try:
        out = [int(t) for t in s.split(",") if t]
    except ValueError:
        die(f"{flag}: '{s}' is not a comma list of integers")
    if not out or min(out) < 1:
        die(f"{flag}: '{s}' needs positive integers")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama,gemma", help="comma list of llama, gemma")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--context", default="4096,32768,131072")
    ap.add_argument("--runs", type=int, default=50, help="timed launches per case (median), >= 50")
    ap.add_argument("--backends", default="flash,cudnn,efficient,math")
    ap.add_argument("--quick", action="store_true", help="batch 1,8 x context 32768,131072")
    ap.add_argument("--out", default="sdpa_bench.json", help="JSON output file")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.context = "1,8", "32768,131072"
    shapes = [s for s in args.shape.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            die(f"--shape: '{s}' is not one of {', '.join(SHAPES)}")
    batches, contexts = int_list("--batch", args.batch), int_list("--context", args.context)
    if args.runs < 50:
        die(f"--runs {args.runs}: use at least 50")

    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        die(f"PyTorch is not installed for {sys.executable} ({e})")
    if not torch.cuda.is_available():
        die(f"no CUDA device visible to PyTorch {torch.__version__} (torch.cuda.is_available() is False)")
    # A refused backend warns before it raises; the error is recorded per row.
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        die(f"PyTorch {torch.__version__} has no torch.nn.attention.sdpa_kernel (need >= 2.3): {e}")
    all_backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    backends = []
    for b in args.backends.split(","):
        if b not in all_backends:
            die(f"--backends: '{b}' is not one of {', '.join(all_backends)}")
        if all_backends[b] is not None:
            backends.append(b)

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 60 << 20)
    # int32 elements: the reduction reads every byte once at full bandwidth.
    flush_buf = torch.zeros(max(256 << 20, 4 * l2) // 4, dtype=torch.int32, device=dev)

    def flush_l2():
        flush_buf.sum()  # a read of the whole buffer; the result is a scalar


    def median_ms(fn, runs):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for a, b in ev:
            flush_l2()
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in ev)

    # Device-to-device copy, read + write counted (REFERENCE.md's convention).
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), 20)
    copy_tb_s = 2 * src.numel() / (copy_ms * 1e-3) / 1e12
    del src, dst
    print(f"sdpa_bench: {props.name}, torch {torch.__version__}, copy {copy_tb_s:.2f} TB/s (read + write), "
          f"medians of {args.runs} runs, L2 flushed (read of {flush_buf.numel() * 4 >> 20} MiB)", flush=True)
    print(f"{'shape':6} {'batch':>5} {'context':>7} {'backend':10} {'gqa':7} {'ms':>9} {'TB/s':>6}", flush=True)

    results = []
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        g = hq // hkv
        for batch in batches:
            for ctx in contexts:
                kv_bytes = 2 * batch * hkv * ctx * d * 2
                q_bytes = batch * hq * d * 2
                nbytes = kv_bytes + q_bytes
                base = {"shape": shape, "n_heads_q": hq, "n_heads_kv": hkv, "head_dim": d,
                        "batch": batch, "context": ctx, "bytes": nbytes}
                free, _ = torch.cuda.mem_get_info()
                if kv_bytes + (1 << 30) > free:
                    for b in backends:
                        results.append({**base, "backend": b,
                                        "error": f"skipped: needs {kv_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} free"})
                    print(f"{shape:6} {batch:5} {ctx:7} skipped: needs {kv_bytes / 2**30:.1f} GiB", flush=True)
                    continue
                gen = torch.Generator(device=dev).manual_seed(batch * 1000003 + ctx)
                q = torch.randn(batch, hq, 1, d, dtype=torch.bfloat16, device=dev, generator=gen)
                k = torch.randn(batch, hkv, ctx, d, dtype=torch.bfloat16, device=dev, generator=gen)
                v = torch.randn(batch, hkv, ctx, d, dtype=torch.bfloat16, device=dev, generator=gen)
                kr = vr = None
                for b in backends:
                    row = {**base, "backend": b}
                    errors = []
                    for gqa in (["native"] if g == 1 else ["native", "repeat"]):
                        try:
                            if gqa == "native":
                                fn = (lambda: F.scaled_dot_product_attention(q, k, v)) if g == 1 else \
                                     (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                            else:
                                if g * kv_bytes > MAX_REPEAT_BYTES:
                                    errors.append(f"repeat: skipped, K/V repeated would take {g * kv_bytes / 2**30:.0f} GiB")
                                    continue
                                if kr is None:
                                    kr = k.repeat_interleave(g, dim=1)
                                    vr = v.repeat_interleave(g, dim=1)
                                fn = lambda: F.scaled_dot_product_attention(q, kr, vr)
                            with sdpa_kernel([all_backends[b]]):
                                fn()
                                torch.cuda.synchronize()
                                ms = median_ms(fn, args.runs)
                            row.update({"gqa": gqa, "ms": ms, "tb_s": nbytes / (ms * 1e-3) / 1e12})
                            break
                        except (RuntimeError, ValueError, NotImplementedError) as e:  # backend refuses the case
                            errors.append(f"{gqa}: {str(e).splitlines()[0][:300]}")
                            torch.cuda.synchronize()
                            torch.cuda.empty_cache()
                    if "ms" not in row:
                        row["error"] = "; ".join(errors)
                        print(f"{shape:6} {batch:5} {ctx:7} {b:10} {'-':7} {row['error'][:100]}", flush=True)
                    else:
                        if errors:
                            row["note"] = "; ".join(errors)
                        print(f"{shape:6} {batch:5} {ctx:7} {b:10} {row['gqa']:7} {row['ms']:9.4f} {row['tb_s']:6.2f}",
                              flush=True)
                    results.append(row)
                del q, k, v, kr, vr
                torch.cuda.empty_cache()

    best = {}
    for r in results:
        if "ms" in r:
            key = (r["shape"], r["batch"], r["context"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    out = {"device": props.name, "torch": torch.__version__, "copy_tb_s": copy_tb_s, "runs": args.runs,
           "l2_flush_bytes": flush_buf.numel() * 4, "l2_flush": "read", "results": results, "best": list(best.values())}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, args.out)
    print("fastest per shape:")
    for r in best.values():
        print(f"  {r['shape']:6} {r['batch']:5} x {r['context']:7}: {r['backend']:10} {r['ms']:.4f} ms "
              f"{r['tb_s']:.2f} TB/s")
    print(f"sdpa_bench: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
