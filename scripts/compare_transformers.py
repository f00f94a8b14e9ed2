#!/usr/bin/env python3
"""Cross-check our forward pass against Hugging Face transformers on the same GGUF.

For each model and fixed prompt: teacher-forced logits at every prompt position
(tq logits, dense fp32 cache, vs transformers' GGUF loader in fp32) and a greedy
continuation of 32 tokens from both. Prints a markdown table, writes golden
logits for the tests (tests/data/golden_logits.json).

Needs: pip install torch transformers accelerate gguf numpy, the models pulled
(tq models pull smollm2-135m gemma3-270m), and a built tq.
    python3 scripts/compare_transformers.py --tq build/release/tools/tq/tq
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM

MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3-270m": "gemma-3-270m-q4_k_m.gguf"}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
]
GOLDEN_IDS = 24  # fixed vocabulary ids stored per position, plus the top 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tq", default="build/release/tools/tq/tq")
    ap.add_argument("--model-dir", default=os.environ.get("TQ_MODEL_DIR", os.path.expanduser("~/.cache/turboquant/models")))
    ap.add_argument("--golden", default="tests/data/golden_logits.json")
    ap.add_argument("--greedy", type=int, default=32)
    a = ap.parse_args()
    rows, golden = [], []
    rng = np.random.default_rng(7)
    for name, fn in MODELS.items():
        hf = AutoModelForCausalLM.from_pretrained(a.model_dir, gguf_file=fn, dtype=torch.float32)
        hf.eval()
        for prompt in PROMPTS:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run([a.tq, "logits", "-m", name, "-p", prompt, "--greedy", str(a.greedy),
                                "--threads", "0", "-o", f.name], check=True, stderr=subprocess.DEVNULL)
                ours = json.load(open(f.name))
            ids = torch.tensor([ours["tokens"]])
            with torch.no_grad():
                ref = hf(ids).logits[0].float().numpy()
                gen = hf.generate(ids, max_new_tokens=a.greedy, do_sample=False, min_new_tokens=a.greedy)
            ref_greedy = gen[0, ids.shape[1]:].tolist()
            ol = np.array(ours["logits"], dtype=np.float32)
            d = np.abs(ol - ref)
            same = 0
            while same < min(len(ref_greedy), len(ours["greedy"])) and ref_greedy[same] == ours["greedy"][same]:
                same += 1
            rows.append((name, prompt, len(ours["tokens"]), float(d.max()), float(ref.max() - ref.min()), same, a.greedy,
                         bool((ol.argmax(1) == ref.argmax(1)).all())))
            fixed = sorted(set(rng.choice(ref.shape[1], GOLDEN_IDS, replace=False).tolist()))
            for pos in (0, len(ours["tokens"]) - 1):
                top = np.argsort(-ref[pos])[:8].tolist()
                idx = sorted(set(fixed + top))
                golden.append({"model": name, "prompt": prompt, "tokens": ours["tokens"], "position": pos,
                               "ids": idx, "logits": [float(ref[pos, i]) for i in idx]})
    print("| model | prompt | tokens | max abs dlogit | logit range | same argmax at every position | greedy tokens identical |")
    print("|---|---|---|---|---|---|---|")
    for name, prompt, n, dmax, rng_, same, total, am in rows:
        p = prompt.replace("\n", "\\n")[:40]
        print(f"| {name} | `{p}` | {n} | {dmax:.2e} | {rng_:.1f} | {'yes' if am else 'no'} | {same}/{total} |")
    json.dump(golden, open(a.golden, "w"), indent=0)
    print(f"\nwrote {len(golden)} golden rows to {a.golden}", file=sys.stderr)
    return 0 if all(r[5] == r[6] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
