// Quantized matmul kernels (kernels/qmatmul.hpp) per weight type, on every
// SIMD level this CPU and build offer, one thread, weights resident in cache
// (576 x 1536 and 2048 x 640: SmolLM2 / Gemma-3 projection shapes, rows x cols).
// Counters: GFLOP/s = 2 rows cols n / time; wbytes/s = weight bytes read per
// second. The scalar level (the reference: dequantize_row + dot) is the
// baseline for speed-ups.
//
//   ./bench_qmatmul --benchmark_filter='Q4_K' --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/qmatmul.hpp"
#include "turboquant/ggml_blocks.hpp"
#include "turboquant/half.hpp"
#include "turboquant/rng.hpp"
#include "turboquant/simd.hpp"

namespace {

using tq::ggml::Type;

// Random quants with small finite fp16 scales at each type's scale offsets.
std::vector<uint8_t> weights(Type t, int rows, int cols) {
  const auto& tr = tq::ggml::traits(t);
  std::vector<uint8_t> w(rows * tq::ggml::row_bytes(t, cols));
  tq::Rng rng(42);
  for (auto& b : w) b = uint8_t(rng.next_u64());
  const uint16_t h = tq::float_to_half(0.01f);
  for (size_t i = 0; i < w.size(); i += tr.block_bytes) {
    switch (t) {
      case Type::f32: {
        const float f = float(rng.gaussian());
        std::memcpy(&w[i], &f, 4);
        break;
      }
      case Type::q6_k: std::memcpy(&w[i + 208], &h, 2); break;
      case Type::f16: case Type::q4_0: case Type::q5_0: case Type::q8_0:
        std::memcpy(&w[i], &h, 2);
        break;
      default:  // d, m / dmin
        std::memcpy(&w[i], &h, 2);
        std::memcpy(&w[i + 2], &h, 2);
    }
  }
  return w;
}

void bm_qmatmul(benchmark::State& state, tq::SimdLevel level, Type t, int rows, int cols, int n) {
  const std::vector<uint8_t> w = weights(t, rows, cols);
  const size_t rb = tq::ggml::row_bytes(t, cols);
  tq::Rng rng(7);
  std::vector<float> x(size_t(n) * cols), y(size_t(n) * rows);
  for (auto& v : x) v = float(rng.gaussian());
  const tq::kernels::QMatmulFn fn = tq::kernels::qmatmul_pick(level, t, cols);
  for (auto _ : state) {
    fn(w.data(), rb, rows, cols, x.data(), n, y.data(), size_t(rows));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double iters = double(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * rows * cols * n * iters * 1e-9,
                                                 benchmark::Counter::kIsRate);
  state.counters["wbytes/s"] = benchmark::Counter(double(w.size()) * iters,
                                                  benchmark::Counter::kIsRate,
                                                  benchmark::Counter::OneK::kIs1024);
}

const int kRegistered = [] {
  const Type types[] = {Type::f32,  Type::f16,  Type::q4_0, Type::q4_1,
                        Type::q5_0, Type::q8_0, Type::q4_k, Type::q6_k};
  const int shapes[][2] = {{576, 1536}, {2048, 640}};
  for (Type t : types)
    for (const auto& s : shapes)
      for (int n : {1, 16})
        for (tq::SimdLevel level : tq::available_simd_levels()) {
          const int cols = tq::ggml::traits(t).block_elems == 256 && s[1] % 256 ? s[1] / 256 * 256 + 256 : s[1];
          const std::string name = "qmatmul/" + tq::ggml::to_string(t) + "/" + std::to_string(s[0]) +
                                   "x" + std::to_string(cols) + "/n:" + std::to_string(n) + "/" +
                                   tq::to_string(level);
          benchmark::RegisterBenchmark(name.c_str(), bm_qmatmul, level, t, s[0], cols, n);
        }
  return 0;
}();

}  // namespace
