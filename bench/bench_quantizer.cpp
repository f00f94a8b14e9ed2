// Quantize (rotate + code + pack) and dequantize (unpack + lookup + inverse
// rotate + scale) throughput, vectors/s on one core, for each SIMD level.
// Run: build/release/bench/bench_quantizer --benchmark_min_time=0.5
// Numbers go into docs/benchmarks.md.
#include <benchmark/benchmark.h>

#include <vector>

#include "turboquant/quantizer.hpp"
#include "turboquant/rng.hpp"
#include "turboquant/simd.hpp"

namespace {

constexpr size_t kBatch = 1024;  // vectors per iteration (fits in L2 at d = 128)

std::vector<float> gaussian(size_t n, uint64_t seed) {
  tq::Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(rng.gaussian());
  return v;
}

void setup(benchmark::State& state, tq::SimdLevel level, const char* spec, int dim,
           std::unique_ptr<tq::Quantizer>& q) {
  bool ok = false;
  for (auto l : tq::available_simd_levels()) ok |= l == level;
  if (!ok) {
    state.SkipWithError("SIMD level not available on this CPU/build");
    return;
  }
  tq::QuantizerOptions opt;
  opt.seed = 1;
  opt.simd = level;
  q = tq::make_quantizer(tq::parse_format(spec), dim, opt);
}

// kBatch random vectors of q's dim, encoded.
std::vector<uint8_t> encoded(const tq::Quantizer& q, int dim) {
  const std::vector<float> x = gaussian(kBatch * dim, 2);
  std::vector<uint8_t> rec(kBatch * q.bytes_per_vector());
  q.encode(x, rec);
  return rec;
}

void BM_quantize(benchmark::State& state, tq::SimdLevel level, const char* spec, int dim) {
  std::unique_ptr<tq::Quantizer> q;
  setup(state, level, spec, dim, q);
  if (!q) return;
  const std::vector<float> x = gaussian(kBatch * dim, 2);
  std::vector<uint8_t> rec(kBatch * q->bytes_per_vector());
  for (auto _ : state) {
    q->encode(x, rec);
    benchmark::DoNotOptimize(rec.data());
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

void BM_dequantize(benchmark::State& state, tq::SimdLevel level, const char* spec, int dim) {
  std::unique_ptr<tq::Quantizer> q;
  setup(state, level, spec, dim, q);
  if (!q) return;
  const std::vector<uint8_t> rec = encoded(*q, dim);
  std::vector<float> y(kBatch * dim);
  for (auto _ : state) {
    q->decode(rec, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

// Attention on records (Quantizer::score / accumulate, GQA group of 4 query
// heads): records/s over kBatch records; the decode-step kernels kv-bench runs.
void BM_score(benchmark::State& state, tq::SimdLevel level, const char* spec, int dim) {
  std::unique_ptr<tq::Quantizer> q;
  setup(state, level, spec, dim, q);
  if (!q) return;
  constexpr int g = 4;
  const std::vector<float> qv = gaussian(g * dim, 3);
  const std::vector<uint8_t> rec = encoded(*q, dim);
  std::vector<float> qp(g * q->query_floats()), scores(g * kBatch);
  q->prepare_queries(qv.data(), g, qp.data());
  for (auto _ : state) {
    q->score(qp.data(), g, rec.data(), q->bytes_per_vector(), kBatch, scores.data());
    benchmark::DoNotOptimize(scores.data());
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

void BM_accumulate(benchmark::State& state, tq::SimdLevel level, const char* spec, int dim) {
  std::unique_ptr<tq::Quantizer> q;
  setup(state, level, spec, dim, q);
  if (!q) return;
  constexpr int g = 4;
  const std::vector<float> w = gaussian(g * kBatch, 4);
  const std::vector<uint8_t> rec = encoded(*q, dim);
  std::vector<float> acc(g * q->acc_floats());
  for (auto _ : state) {
    q->accumulate(w.data(), g, rec.data(), q->bytes_per_vector(), kBatch, acc.data());
    benchmark::DoNotOptimize(acc.data());
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

}  // namespace

// Names use the spec strings (the project's one configuration language).
BENCHMARK_CAPTURE(BM_quantize, tq_mse_b3_d128_scalar, tq::SimdLevel::scalar, "tq-mse:b=3", 128);
BENCHMARK_CAPTURE(BM_quantize, tq_mse_b3_d128_avx2, tq::SimdLevel::avx2, "tq-mse:b=3", 128);
BENCHMARK_CAPTURE(BM_quantize, tq_mse_b3_d128_avx512, tq::SimdLevel::avx512, "tq-mse:b=3", 128);
BENCHMARK_CAPTURE(BM_quantize, tq_mse_b4_d128_scalar, tq::SimdLevel::scalar, "tq-mse:b=4", 128);
BENCHMARK_CAPTURE(BM_quantize, tq_mse_b4_d128_avx2, tq::SimdLevel::avx2, "tq-mse:b=4", 128);
BENCHMARK_CAPTURE(BM_quantize, tq_mse_b4_d128_avx512, tq::SimdLevel::avx512, "tq-mse:b=4", 128);
BENCHMARK_CAPTURE(BM_dequantize, tq_mse_b3_d128_scalar, tq::SimdLevel::scalar, "tq-mse:b=3", 128);
BENCHMARK_CAPTURE(BM_dequantize, tq_mse_b3_d128_avx2, tq::SimdLevel::avx2, "tq-mse:b=3", 128);
BENCHMARK_CAPTURE(BM_dequantize, tq_mse_b3_d128_avx512, tq::SimdLevel::avx512, "tq-mse:b=3", 128);
BENCHMARK_CAPTURE(BM_dequantize, tq_mse_b4_d128_scalar, tq::SimdLevel::scalar, "tq-mse:b=4", 128);
BENCHMARK_CAPTURE(BM_dequantize, tq_mse_b4_d128_avx2, tq::SimdLevel::avx2, "tq-mse:b=4", 128);
BENCHMARK_CAPTURE(BM_dequantize, tq_mse_b4_d128_avx512, tq::SimdLevel::avx512, "tq-mse:b=4", 128);
// Context: the other methods at 3 bits on the best path.
BENCHMARK_CAPTURE(BM_quantize, tq_prod_b3_d128_best, tq::best_simd_level(), "tq-prod:b=3", 128);
BENCHMARK_CAPTURE(BM_dequantize, tq_prod_b3_d128_best, tq::best_simd_level(), "tq-prod:b=3", 128);
BENCHMARK_CAPTURE(BM_quantize, polar_d128_best, tq::best_simd_level(), "polar", 128);
BENCHMARK_CAPTURE(BM_dequantize, polar_d128_best, tq::best_simd_level(), "polar", 128);
BENCHMARK_CAPTURE(BM_score, polar_d128_scalar, tq::SimdLevel::scalar, "polar", 128);
BENCHMARK_CAPTURE(BM_score, polar_d128_avx512, tq::SimdLevel::avx512, "polar", 128);
BENCHMARK_CAPTURE(BM_accumulate, polar_d128_avx512, tq::SimdLevel::avx512, "polar", 128);
BENCHMARK_CAPTURE(BM_score, tq_mse_b4_d128_avx512, tq::SimdLevel::avx512, "tq-mse:b=4", 128);
BENCHMARK_CAPTURE(BM_accumulate, tq_mse_b4_d128_avx512, tq::SimdLevel::avx512, "tq-mse:b=4", 128);
BENCHMARK_CAPTURE(BM_score, f16_d128_avx512, tq::SimdLevel::avx512, "f16", 128);
BENCHMARK_CAPTURE(BM_score, f32_d128_avx512, tq::SimdLevel::avx512, "f32", 128);
