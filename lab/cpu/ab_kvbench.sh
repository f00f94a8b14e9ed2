#!/usr/bin/env bash
# One device-host call (CPU only): A/B/C of CPU attention kernel patches with
# `tq kv-bench` on that machine's Xeon. B = the tree as it is; A = the tree
# with $PATCH_B (default lab/cpu/prefetch_codes.patch) reversed; C = B plus
# $PATCH_C (default lab/cpu/prefetch_dense.patch). A CPU-only Release build
# (needs build/gpu-deps in the carry list for CLI11 / nlohmann_json);
# $ROUNDS rounds of A, B, C in turn; $KV_ARGS the kv-bench arguments. Prints
# each run's table and leaves them in $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
OUT=${OUT:-./cpu-out}; mkdir -p "$OUT"
PATCH_B=${PATCH_B:-lab/cpu/prefetch_codes.patch}
PATCH_C=${PATCH_C:-lab/cpu/prefetch_dense.patch}
ROUNDS=${ROUNDS:-2}
read -r -a KV <<<"${KV_ARGS:---preset paper_mse,turbo4 --context 32768,131072 --threads 1,0}"
B=/tmp/tq-cpu-build
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQ_CUDA=OFF -DTQ_BUILD_TESTS=OFF -DTQ_BUILD_BENCH=OFF \
  -DCMAKE_PREFIX_PATH="$PWD/build/gpu-deps" >"$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
build() { cmake --build "$B" -j16 --target tq >>"$OUT/build.log" 2>&1 && cp "$B/tools/tq/tq" "/tmp/tq_$1"; }
build B || { tail -20 "$OUT/build.log"; exit 1; }
patch -p1 <"$PATCH_C" >/dev/null && build C; patch -R -p1 <"$PATCH_C" >/dev/null
patch -R -p1 <"$PATCH_B" >/dev/null && build A; patch -p1 <"$PATCH_B" >/dev/null
sleep 1; touch src/kernels/attn-avx512.cpp
for r in $(seq "$ROUNDS"); do
  for v in A B C; do
    [[ -x /tmp/tq_$v ]] || continue
    echo "== $v round $r"; /tmp/tq_$v kv-bench "${KV[@]}" --check 2>&1 | tee "$OUT/${v}_$r.txt" | grep -E "dense-f16|paper_mse|turbo4|turbo3|q4_0"
  done
done
