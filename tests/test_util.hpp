// Shared test policy (see docs/testing.md):
//  - integer codes and packed bytes: exact;
//  - floats: |a - b| <= atol + rtol * |ref| (expect_close);
//  - quantizers: by their distortion budget per bit width;
//  - awkward shapes from kAwkwardLengths; random data from a printed seed.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "turboquant/error.hpp"
#include "turboquant/rng.hpp"

namespace tq::test {

inline const std::vector<int> kAwkwardLengths = {1, 2, 31, 33, 54, 97, 129, 257};

inline std::vector<float> random_gaussian(size_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(rng.gaussian());
  return v;
}

// n unit vectors of dimension dim, row-major [n, dim].
inline std::vector<float> random_unit_vectors(size_t n, int dim, uint64_t seed) {
  std::vector<float> v = random_gaussian(n * dim, seed);
  for (size_t r = 0; r < n; ++r) {
    double s = 0;
    for (int i = 0; i < dim; ++i) s += double(v[r * dim + i]) * v[r * dim + i];
    const double inv = 1.0 / std::sqrt(s);
    for (int i = 0; i < dim; ++i) v[r * dim + i] = static_cast<float>(v[r * dim + i] * inv);
  }
  return v;
}

// ||a - ref|| / ||ref|| over n floats (attention outputs are judged by this).
inline double norm_err(const float* a, const float* ref, size_t n) {
  double e = 0, r = 0;
  for (size_t i = 0; i < n; ++i) {
    e += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
    r += double(ref[i]) * ref[i];
  }
  return std::sqrt(e / std::max(r, 1e-30));
}

// K/V-like data with realistic structure: every 17th channel large (x6, mean
// 2), the others with mean 0.3. [n_tokens, heads, dim]
inline std::vector<float> kv_data(size_t n_tokens, int heads, int dim, uint64_t seed) {
  std::vector<float> x = random_gaussian(n_tokens * heads * dim, seed);
  for (size_t i = 0; i < x.size(); ++i) {
    const int c = static_cast<int>(i % dim);
    if (c % 17 == 3) x[i] = 6.0f * x[i] + 2.0f;
    else x[i] += 0.3f;
  }
  return x;
}

// The message of the tq::Error that f() throws, or "(no tq::Error thrown)".
template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no tq::Error thrown)";
}

inline ::testing::AssertionResult close(double a, double ref, double atol, double rtol) {
  if (std::fabs(a - ref) <= atol + rtol * std::fabs(ref)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << a << " vs ref " << ref << " (atol " << atol << ", rtol "
                                       << rtol << ")";
}

}  // namespace tq::test
