#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing (setup.sh),
# then builds and tests two presets:
#   release  build/release  optimised build, every test
#   asan     build/asan     the same suite under AddressSanitizer + UBSan
# Both presets run even if the first fails, so one run reports everything;
# the exit status is non-zero if any step failed.
# TQ_JOBS sets build and test parallelism (default 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

JOBS=${TQ_JOBS:-2}
failed=()

step() {  # step NAME CMD...: runs CMD, records NAME if it fails
  local name=$1; shift
  echo "==> [$name] $*"
  local t0=$SECONDS
  if "$@"; then
    echo "==> [$name] ok ($((SECONDS - t0)) s)"
  else
    echo "==> [$name] FAILED (exit $?, $((SECONDS - t0)) s)"
    failed+=("$name")
    return 1
  fi
}

bash scripts/setup.sh

# The model tests run on the real models (SmolLM2-135M, Gemma-3-270M); pull
# them into the cache first (a no-op once they are there and verified).
pull_models() {
  cmake --build --preset release -j "$JOBS" --target tq &&
    { build/release/tools/tq/tq models pull smollm2-135m gemma3-270m ||
      build/release/tools/tq/tq models pull smollm2-135m gemma3-270m; }
}

for preset in release asan; do
  step "$preset configure" cmake --preset "$preset" &&
    { [ "$preset" != release ] || step "pull models" pull_models; } &&
    step "$preset build" cmake --build --preset "$preset" -j "$JOBS" &&
    step "$preset test" ctest --preset "$preset" --output-on-failure -j "$JOBS" ||
    true
done

if ((${#failed[@]})); then
  echo "test.sh: FAILED steps: $(printf '[%s] ' "${failed[@]}")"
  exit 1
fi
echo "test.sh: all tests passed (release and asan)"
