// CPU kernel primitives at the sizes one head vector needs (head_dim 128),
// timed on every SIMD level this CPU and build offer. items/s = vectors/s.
// The scalar level is the baseline for speed-ups; copy/n:128 (a memcpy of one
// fp32 vector) is the bandwidth yardstick measured in the same run.
//
//   ./bench_kernels --benchmark_filter='fwht|quantize'
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/kernels.hpp"
#include "turboquant/rng.hpp"
#include "turboquant/simd.hpp"

namespace {

using tq::kernels::Kernels;

constexpr int kDim = 128;

std::vector<float> gaussian(size_t n, uint64_t seed) {
  tq::Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(rng.gaussian());
  return v;
}

std::vector<uint8_t> codes_for(size_t n, int bits, uint64_t seed) {
  tq::Rng rng(seed);
  std::vector<uint8_t> c(n);
  for (auto& v : c) v = static_cast<uint8_t>(rng.below(uint64_t{1} << bits));
  return c;
}

// 2^bits - 1 ascending boundaries on the N(0, 1/d) scale of a rotated unit vector.
std::vector<float> boundaries_for(int bits) {
  std::vector<float> b = gaussian((size_t(1) << bits) - 1, 7);
  for (auto& x : b) x *= 0.0884f;  // 1/sqrt(128)
  std::sort(b.begin(), b.end());
  return b;
}

void bench_copy(benchmark::State& state) {
  const std::vector<float> src = gaussian(kDim, 1);
  std::vector<float> dst(kDim);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), kDim * sizeof(float));
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
  state.SetBytesProcessed(state.iterations() * int64_t{kDim} * 4);
}

void bench_fwht(benchmark::State& state, const Kernels* k) {
  // Orthonormal post-scale: repeated transforms keep the data bounded.
  std::vector<float> x = gaussian(kDim, 2);
  const float post = 0.08838834764831845f;
  for (auto _ : state) {
    k->fwht(x.data(), kDim, post);
    benchmark::DoNotOptimize(x.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}

void bench_quantize(benchmark::State& state, const Kernels* k, int bits) {
  const std::vector<float> x = gaussian(kDim, 3);
  const std::vector<float> b = boundaries_for(bits);
  std::vector<uint8_t> codes(kDim);
  for (auto _ : state) {
    k->quantize(x.data(), kDim, 0.0884f, b.data(), bits, codes.data());
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}

void bench_dequantize(benchmark::State& state, const Kernels* k, int bits) {
  const std::vector<uint8_t> codes = codes_for(kDim, bits, 4);
  const std::vector<float> cents = gaussian(size_t(1) << bits, 5);
  std::vector<float> out(kDim);
  for (auto _ : state) {
    k->dequantize(codes.data(), kDim, cents.data(), bits, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}

void bench_pack(benchmark::State& state, const Kernels* k, int bits) {
  const std::vector<uint8_t> codes = codes_for(kDim, bits, 6);
  std::vector<uint8_t> out((kDim * bits + 7) / 8);
  for (auto _ : state) {
    k->pack(codes.data(), kDim, bits, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}

void bench_unpack(benchmark::State& state, const Kernels* k, int bits) {
  const std::vector<uint8_t> codes = codes_for(kDim, bits, 6);
  std::vector<uint8_t> packed((kDim * bits + 7) / 8), out(kDim);
  tq::kernels::kernels_ref().pack(codes.data(), kDim, bits, packed.data());
  for (auto _ : state) {
    k->unpack(packed.data(), kDim, bits, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}

void bench_dot(benchmark::State& state, const Kernels* k) {
  const std::vector<float> a = gaussian(kDim, 8), b = gaussian(kDim, 9);
  for (auto _ : state) benchmark::DoNotOptimize(k->dot(a.data(), b.data(), kDim));
  state.SetItemsProcessed(state.iterations());
}

// A dense 128 x 128 rotation applied to one vector.
void bench_matvec(benchmark::State& state, const Kernels* k) {
  const std::vector<float> m = gaussian(size_t{kDim} * kDim, 10), x = gaussian(kDim, 11);
  std::vector<float> y(kDim);
  for (auto _ : state) {
    k->matvec(m.data(), x.data(), y.data(), kDim, kDim);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}

// Registered at start-up, one set per available level (the CPU check inside
// available_simd_levels() is safe to run anywhere).
const bool kRegistered = [] {
  benchmark::RegisterBenchmark("copy/n:128", bench_copy);
  for (tq::SimdLevel level : tq::available_simd_levels()) {
    const Kernels* k = &tq::kernels::kernels_for(level);
    const std::string lv = tq::to_string(level);
    benchmark::RegisterBenchmark(("fwht/" + lv + "/n:128").c_str(), bench_fwht, k);
    benchmark::RegisterBenchmark(("dot/" + lv + "/n:128").c_str(), bench_dot, k);
    benchmark::RegisterBenchmark(("matvec/" + lv + "/128x128").c_str(), bench_matvec, k);
    for (int bits : {3, 4}) {
      const std::string tail = "/n:128/bits:" + std::to_string(bits);
      benchmark::RegisterBenchmark(("quantize/" + lv + tail).c_str(), bench_quantize, k, bits);
      benchmark::RegisterBenchmark(("dequantize/" + lv + tail).c_str(), bench_dequantize, k, bits);
      benchmark::RegisterBenchmark(("pack/" + lv + tail).c_str(), bench_pack, k, bits);
      benchmark::RegisterBenchmark(("unpack/" + lv + tail).c_str(), bench_unpack, k, bits);
    }
  }
  return true;
}();

}  // namespace
