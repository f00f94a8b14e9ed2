# Sourced by the lab scripts: the repository root as working directory, the
# build directory $B, the output directory $OUT, and the sm_90-only build of
# tq and test_cuda that each device call starts with.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
B=${TQ_GPU_BUILD:-/tmp/tq-gpu-build}
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
t0=$(date +%s)

lab_configure() {
  cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQ_CUDA=ON -DTQ_BUILD_TESTS=ON -DTQ_BUILD_TOOLS=ON \
    -DTQ_BUILD_BENCH=OFF -DCMAKE_PREFIX_PATH="$PWD/build/gpu-deps" -DTQ_CUDA_ARCHS=90-real >"$OUT/build.log" 2>&1
}
# lab_build TARGET...: build into $B, the tail of the log on failure.
lab_build() {
  cmake --build "$B" -j16 --target "$@" >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; return 1; }
}
# Runs test_cuda, prints its summary and any failed test.
lab_test_cuda() {
  timeout 200 "$B/tests/test_cuda" >"$OUT/test_cuda.log" 2>&1
  echo "test_cuda rc=$? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/test_cuda.log" | tr '\n' ' ')"
  grep -E "^\[  FAILED" "$OUT/test_cuda.log" | head
}
# lab_build_mode M DEST: builds tq with `#define TQ_LAB_MODE M` in the decode
# kernel (a lab patch that defines it must be applied) and copies it to DEST.
lab_build_mode() {
  sed -i "s/^#define TQ_LAB_MODE [0-9]/#define TQ_LAB_MODE $1/" src/cuda/decode_attention_tc.cu
  lab_build tq && cp "$B/tools/tq/tq" "$2"
}
# lab_build_lineinfo DIR: tq alone, -lineinfo (ncu's source page), sm_90, into DIR.
lab_build_lineinfo() {
  cmake -S . -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQ_CUDA=ON -DTQ_BUILD_TESTS=OFF -DTQ_BUILD_TOOLS=ON \
    -DTQ_BUILD_BENCH=OFF -DTQ_CUDA_ARCHS=90-real -DCMAKE_CUDA_FLAGS=-lineinfo "-DCMAKE_PREFIX_PATH=$PWD/build/gpu-deps" \
    >"$OUT/lines_build.log" 2>&1 && cmake --build "$1" -j 16 --target tq >>"$OUT/lines_build.log" 2>&1 ||
    { tail -30 "$OUT/lines_build.log"; return 1; }
}
