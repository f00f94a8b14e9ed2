// Distortion of a format on random unit vectors, the numbers of the
// TurboQuant paper (Theorems 1-2): D_mse = E|x - x_hat|^2 and the error of
// inner products e = <y, x_hat> - <y, x> for independent unit queries y.
//
//   auto r = tq::measure_distortion(tq::parse_format("tq-mse:b=3"), 128, 20000, 1);
//   r.mse;  // ~0.0340
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "turboquant/format.hpp"

namespace tq {

struct DistortionResult {
  double bits_per_coord = 0;  // real storage, scales included
  double mse = 0;             // mean |x - x_hat|^2
  double mse_stderr = 0;      // its standard error
  double ip_bias = 0;         // dim * mean(e)
  double ip_var = 0;          // dim * var(e)   (compare with dim * D_prod)
  double ip_bias_stderr = 0;  // dim * stddev(e) / sqrt(n): the noise on ip_bias
  double seconds = 0;         // encode + decode wall time
};

// x and y drawn from Rng(derive_seed(seed, "x"/"y")); the quantizer uses `seed`.
// threads = 0: all hardware threads.
DistortionResult measure_distortion(const FormatSpec& spec, int dim, size_t samples,
                                    uint64_t seed, int threads = 1);

// Reference values for the printed table (shared/REFERENCE.md section 1-2):
// the paper's D_mse (b = 1..4) and dim * D_prod (Gaussian S, b = 1..4), and
// the theorem bounds.
std::optional<double> paper_mse(int bits);
std::optional<double> paper_prod_dvar(int bits);
double mse_upper_bound(double bits);   // sqrt(3) pi / 2 * 4^-b
double mse_lower_bound(double bits);   // 4^-b
double prod_upper_bound(double bits);  // sqrt(3) pi^2 * 4^-b   (times |y|^2 / d; we print d * D)
double prod_lower_bound(double bits);  // 4^-b

}  // namespace tq
