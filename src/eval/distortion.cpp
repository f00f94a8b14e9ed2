#include "turboquant/distortion.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numbers>
#include <thread>
#include <vector>

#include "turboquant/error.hpp"
#include "turboquant/quantizer.hpp"
#include "turboquant/rng.hpp"

namespace tq {
namespace {

void unit_vectors(std::vector<float>& v, size_t n, int dim, uint64_t seed) {
  Rng rng(seed);
  v.resize(n * dim);
  std::vector<double> g(dim);
  for (size_t r = 0; r < n; ++r) {
    double s = 0;
    for (int i = 0; i < dim; ++i) {
      g[i] = rng.gaussian();
      s += g[i] * g[i];
    }
    const double inv = 1.0 / std::sqrt(s);
    for (int i = 0; i < dim; ++i) v[r * dim + i] = static_cast<float>(g[i] * inv);
  }
}

}  // namespace

DistortionResult measure_distortion(const FormatSpec& spec, int dim, size_t samples,
                                    uint64_t seed, int threads) {
  TQ_REQUIRE(samples >= 2, "samples must be >= 2, got ", samples);
  QuantizerOptions opt;
  opt.seed = seed;
  auto q = make_quantizer(spec, dim, opt);
  std::vector<float> x, y;
  unit_vectors(x, samples, dim, derive_seed(seed, "x"));
  unit_vectors(y, samples, dim, derive_seed(seed, "y"));

  std::vector<float> xhat(samples * dim);
  std::vector<uint8_t> rec(samples * q->bytes_per_vector());
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  threads = static_cast<int>(std::min<size_t>(threads, samples));
  const auto t0 = std::chrono::steady_clock::now();
  auto work = [&](size_t lo, size_t hi) {
    const size_t B = q->bytes_per_vector();
    q->encode({x.data() + lo * dim, (hi - lo) * dim}, {rec.data() + lo * B, (hi - lo) * B});
    q->decode({rec.data() + lo * B, (hi - lo) * B}, {xhat.data() + lo * dim, (hi - lo) * dim});
  };
  if (threads == 1) {
    work(0, samples);
  } else {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back(work, samples * t / threads, samples * (t + 1) / threads);
    for (auto& th : pool) th.join();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Statistics in double, Welford for the inner-product error.
  double mse = 0, mse_sq = 0, mean = 0, m2 = 0;
  for (size_t r = 0; r < samples; ++r) {
    const float* xr = &x[r * dim];
    const float* hr = &xhat[r * dim];
    const float* yr = &y[r * dim];
    double err = 0, ip = 0, iphat = 0;
    for (int i = 0; i < dim; ++i) {
      const double d = double(xr[i]) - hr[i];
      err += d * d;
      ip += double(yr[i]) * xr[i];
      iphat += double(yr[i]) * hr[i];
    }
    mse += err;
    mse_sq += err * err;
    const double e = iphat - ip;
    const double delta = e - mean;
    mean += delta / double(r + 1);
    m2 += delta * (e - mean);
  }
  DistortionResult res;
  res.bits_per_coord = q->bits_per_coord();
  res.mse = mse / double(samples);
  res.mse_stderr =
      std::sqrt(std::max(0.0, mse_sq / double(samples) - res.mse * res.mse) / double(samples - 1));
  const double var = m2 / double(samples - 1);
  res.ip_bias = dim * mean;
  res.ip_var = dim * var;
  res.ip_bias_stderr = dim * std::sqrt(var / double(samples));
  res.seconds = secs;
  return res;
}

std::optional<double> paper_mse(int bits) {
  static const double v[] = {0.36, 0.117, 0.03, 0.009};
  if (bits >= 1 && bits <= 4) return v[bits - 1];
  return std::nullopt;
}

std::optional<double> paper_prod_dvar(int bits) {
  static const double v[] = {1.57, 0.56, 0.18, 0.047};
  if (bits >= 1 && bits <= 4) return v[bits - 1];
  return std::nullopt;
}

double mse_upper_bound(double b) { return std::sqrt(3.0) * std::numbers::pi / 2 * std::pow(4.0, -b); }
double mse_lower_bound(double b) { return std::pow(4.0, -b); }
double prod_upper_bound(double b) {
  return std::sqrt(3.0) * std::numbers::pi * std::numbers::pi * std::pow(4.0, -b);
}
double prod_lower_bound(double b) { return std::pow(4.0, -b); }

}  // namespace tq
