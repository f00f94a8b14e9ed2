#!/usr/bin/env python3
"""Shared-memory wavefronts of the tensor-core decode kernel's code-segment
loads (eighteenth session; docs/kernel-notes.md): per 16-token tile, the K
loads (tokens perm(gq) and perm(gq + 8), 4 lanes a token, a lane's D/4 dims),
the V loads (4 tokens a load, 8 lanes a token, D/8 dims) and the scale loads,
as the kernel issues them (32-bit loads, records back to back in a stage).
A load's wavefronts = the most distinct words any bank serves. Then a search
over every split of the tile's 16 tokens into the kernel's load groups for
a cheaper row permutation (none exists for 3-bit records).
Usage: bank_conflicts.py [D KB VB]   (default: a table of the d 128 / 256 presets)"""
import itertools
import sys


def wavefronts(words):
    banks = {}
    for w in words:
        banks.setdefault(w % 32, set()).add(w)
    return max(len(s) for s in banks.values())


def costs(D, KB, VB):
    krec, vrec = D * KB // 8 + 2, D * VB // 8 + 2
    kseg, vseg = D * KB // 32, D * VB // 64
    kl, vl = (kseg + 3) // 4 + 1, (vseg + 3) // 4 + 1  # loads a segment (+1: the funnel shift)

    def kcost(tokens):  # the K loads of 8 tokens, and their scales
        c = sum(wavefronts([(t * krec + tq * kseg) // 4 + i for t in tokens for tq in range(4)]) for i in range(kl))
        return c + wavefronts([(t * krec + krec - 2) // 4 for t in tokens])

    def vcost(tokens):  # the V loads of 4 tokens
        return sum(wavefronts([(t * vrec + gq * vseg) // 4 + i for t in tokens for gq in range(8)]) for i in range(vl))

    def vscale(tokens):
        return wavefronts([(t * vrec + vrec - 2) // 4 for t in tokens])

    loads = 2 * (kl + 1) + 4 * vl + 2
    return kcost, vcost, vscale, loads


def tile_cost(D, KB, VB, perm):
    kcost, vcost, vscale, loads = costs(D, KB, VB)
    s, c = perm[:8], perm[8:]
    groups = [[perm[2 * tq + e + 8 * f] for tq in range(4)] for f in range(2) for e in range(2)]
    return kcost(s) + kcost(c) + sum(vcost(g) for g in groups) + vscale(s) + vscale(c), loads


def search(D, KB, VB):
    kcost, vcost, vscale, _ = costs(D, KB, VB)
    toks = range(16)
    vc = {g: vcost(g) for g in itertools.combinations(toks, 4)}
    best = None
    for s in itertools.combinations(toks, 8):
        c = tuple(t for t in toks if t not in s)
        kc = kcost(s) + kcost(c) + vscale(s) + vscale(c)
        if best and kc >= best[0]:
            continue

        def split(x):
            return min(vc[(x[0],) + g] + vc[tuple(t for t in x if t not in (x[0],) + g)]
                       for g in itertools.combinations(x[1:], 3))
        tot = kc + split(s) + split(c)
        if best is None or tot < best[0]:
            best = (tot, s)
    return best


CURRENT = [(r % 8 >> 1) + 4 * (r % 8 & 1) + 8 * (r // 8) for r in range(16)]  # the kernel's rows

if __name__ == "__main__":
    cases = [tuple(map(int, sys.argv[1:4]))] if len(sys.argv) >= 4 else \
        [(128, 4, 4), (128, 3, 3), (128, 3, 4), (256, 4, 4), (256, 3, 3), (256, 3, 4)]
    for D, KB, VB in cases:
        wf, loads = tile_cost(D, KB, VB, CURRENT)
        line = f"d {D} K {KB} V {VB}: {loads} loads a tile -> {wf} wavefronts ({wf - loads} from conflicts)"
        if D == 128:
            line += f"; best row permutation: {search(D, KB, VB)[0]} wavefronts"
        print(line)
