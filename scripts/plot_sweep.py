#!/usr/bin/env python3
"""Plot a `tq sweep` result: KL mean and perplexity delta against bits per coordinate.

    python3 scripts/plot_sweep.py DIR/sweep.json DIR/sweep.png

Two panels: mean KL(dense || preset) on a log scale, and the perplexity delta in %
(symmetric log scale: 2-bit points sit at hundreds of %, q8_0 at hundredths).
One series per key kind: MSE keys and prod (QJL) keys as lines, the q4_0/q8_0
baselines and their Hadamard-rotated variants as separate markers.
Exit code 3 when matplotlib is missing (tq sweep names the package to install).
"""
import json
import sys

SERIES = {  # series key in sweep.json -> (label, marker, line)
    "mse": ("TurboQuant, MSE keys", "o", "-"),
    "mse+out": ("TurboQuant, MSE keys + 1/8 outlier channels (+2 bits)", "D", "-"),
    "prod": ("TurboQuant, prod (QJL) keys", "s", "--"),
    "q": ("q4_0 / q8_0", "^", ""),
    "q-had": ("q4_0 / q8_0 + Hadamard", "v", ""),
}


def short_name(r):
    """turbo4, q4_0-had, ...; a custom k=SPEC/v=SPEC as "K prod:b=3 / V mse:b=3"."""
    p = r["preset"]
    if not p.startswith("k="):
        return p
    return f"K {r['k_spec']} / V {r['v_spec']}".replace("tq-", "")


def main(argv):
    if len(argv) != 3:
        print("usage: plot_sweep.py SWEEP_JSON OUT_PNG", file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plot_sweep.py: matplotlib is missing ({e}); install it with: apt-get install python3-matplotlib",
              file=sys.stderr)
        return 3
    with open(argv[1]) as f:
        rows = json.load(f)
    if not rows:
        print(f"plot_sweep.py: {argv[1]} holds no result", file=sys.stderr)
        return 2

    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.8))
    for key, (label, marker, line) in SERIES.items():
        pts = sorted((r for r in rows if r.get("series") == key), key=lambda r: r["bits_per_coord"])
        if not pts:
            continue
        x = [r["bits_per_coord"] for r in pts]
        kl = [max(r["kl_mean"], 1e-7) for r in pts]  # log scale: a zero would vanish
        dp = [r["ppl_delta_pct"] for r in pts]
        for ax, y in ((ax_kl, kl), (ax_ppl, dp)):
            ax.plot(x, y, marker=marker, linestyle=line or "none", label=label)
            for r, xi, yi in zip(pts, x, y):
                ax.annotate(short_name(r), (xi, yi), textcoords="offset points",
                            xytext=(4, 4), fontsize=6)
    r0 = rows[0]
    title = f"{r0.get('model', '')}, ctx {r0.get('ctx', '')}, {r0.get('tokens', '')} scored tokens"
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("mean KL(dense || preset), nats")
    ax_ppl.set_yscale("symlog", linthresh=1.0)
    ax_ppl.axhline(0, color="grey", linewidth=0.8)
    ax_ppl.set_ylabel(f"perplexity delta % (dense {r0['ppl_dense']:.3f})")
    for ax in (ax_kl, ax_ppl):
        ax.set_xlabel("bits per coordinate, K and V averaged, scales included")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(argv[2], dpi=130)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
