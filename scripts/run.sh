#!/usr/bin/env bash
# The main job: installs what is missing (setup.sh), builds the release preset,
# then runs the tq tool. With no arguments it measures the MSE distortion of
# TurboQuant codes at 1-4 bits for 128-dimensional vectors; any arguments are
# passed to tq instead:
#   bash scripts/run.sh                       # the default distortion table
#   bash scripts/run.sh distortion --help     # tq with your own arguments
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
  set -- distortion --method mse --dim 128 --bits 1,2,3,4 --samples 20000
fi
echo "run.sh: $TQ $*" >&2
exec "$TQ" "$@"
