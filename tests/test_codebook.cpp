// Lloyd-Max codebooks: checked against the published numbers (REFERENCE.md section 1), against
// closed forms, and against an independent composite-Simpson integration of each law's
// density (the library uses Gauss-Legendre, continued fractions and erfc instead).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <thread>
#include <vector>

#include "test_util.hpp"
#include "turboquant/codebook.hpp"
#include "turboquant/error.hpp"

namespace tq {
namespace {

using test::close;

constexpr double kPi = std::numbers::pi;

// REFERENCE.md section 1: d * D_mse per bit width 1..4.
constexpr double kGaussDistortion[4] = {0.36338, 0.11748, 0.03455, 0.009501};
constexpr double kExact64Distortion[4] = {0.35839, 0.11453, 0.03339, 0.009132};
constexpr double kExact128Distortion[4] = {0.36089, 0.11600, 0.03397, 0.009315};
constexpr double kExact256Distortion[4] = {0.36214, 0.11674, 0.03426, 0.009408};

// REFERENCE.md section 1: positive halves of the N(0, 1) Lloyd-Max codebooks, 1..4 bits.
const std::vector<std::vector<double>> kStandardNormalCentroids = {
    {0.7978845608},
    {0.4527800346, 1.5104176085},
    {0.2450941789, 0.7560052812, 1.3439092785, 2.1519457045},
    {0.1283950299, 0.3880482995, 0.6567591185, 0.9423404565, 1.2562311973, 1.6180463860,
     2.0690172265, 2.7325895710},
};

// REFERENCE.md section 1: exact law, d = 128, 4 bits, positive half.
constexpr double kExact128FourBit[8] = {0.011302, 0.034152, 0.057772, 0.082828,
                                        0.110288, 0.141805, 0.180836, 0.237664};

std::string describe(CodebookLaw law, int dim, int bits) {
  const char* name = law == CodebookLaw::exact   ? "exact"
                     : law == CodebookLaw::gauss ? "gauss"
                                                 : "polar_angle";
  return std::string(name) + " dim/level " + std::to_string(dim) + " bits " + std::to_string(bits);
}

// ---- an independent description of each law, for Simpson integration -----------------------

struct Law {
  double lo, hi;         // support
  double center, sigma;  // integration is clipped to center +- 12 sigma (the rest is < e^-70)
  double (*density_fn)(double x, double param);
  double param;
  double density(double x) const { return density_fn(x, param); }
};

double exact_density(double t, double dim) {
  return std::abs(t) >= 1 ? 0.0 : std::pow(1.0 - t * t, 0.5 * (dim - 3));
}
double gauss_density(double t, double dim) { return std::exp(-0.5 * dim * t * t); }
double polar_density(double psi, double n) { return std::pow(std::sin(2 * psi), n - 1); }

Law law_of(CodebookLaw law, int dim) {
  switch (law) {
    case CodebookLaw::exact:
      return {-1, 1, 0, 1 / std::sqrt(double(dim)), exact_density, double(dim)};
    case CodebookLaw::gauss:
      return {-HUGE_VAL, HUGE_VAL, 0, 1 / std::sqrt(double(dim)), gauss_density, double(dim)};
    case CodebookLaw::polar_angle: {
      const double n = std::ldexp(1.0, dim - 1);  // dim is the level (>= 2 here)
      return {0, kPi / 2, kPi / 4, 0.5 / std::sqrt(n - 1), polar_density, n};
    }
  }
  return {};
}

// Composite Simpson's rule for f on [a, b] with n (even) intervals.
template <class F>
double simpson(const F& f, double a, double b, int n) {
  if (!(b > a)) return 0;
  const double h = (b - a) / n;
  double sum = f(a) + f(b);
  for (int k = 1; k < n; ++k) sum += (k % 2 ? 4.0 : 2.0) * f(a + k * h);
  return sum * h / 3;
}

struct CellMoments {
  std::vector<double> mass, mean;
  double mse = 0;  // E[(x - q(x))^2] with the codebook's centroids
};

CellMoments integrate_cells(const Law& law, const std::vector<double>& c) {
  const size_t k = c.size();
  std::vector<double> edge(k + 1);
  // Clipped so that Simpson's step stays fine in the outer cells, whose density falls by
  // e^-(c/sigma) per sigma: over 40 sigma its error reached 2e-7 sigma at 8 bits.
  edge[0] = std::max(law.lo, law.center - 12 * law.sigma);
  edge[k] = std::min(law.hi, law.center + 12 * law.sigma);
  for (size_t i = 1; i < k; ++i) edge[i] = std::clamp(0.5 * (c[i - 1] + c[i]), edge[0], edge[k]);
  CellMoments out;
  double total = 0, squared_error = 0;
  for (size_t i = 0; i < k; ++i) {
    const double a = edge[i], b = edge[i + 1];
    const double mass = simpson([&](double x) { return law.density(x); }, a, b, 2000);
    const double first = simpson([&](double x) { return x * law.density(x); }, a, b, 2000);
    squared_error +=
        simpson([&](double x) { return (x - c[i]) * (x - c[i]) * law.density(x); }, a, b, 2000);
    out.mass.push_back(mass);
    out.mean.push_back(first / mass);
    total += mass;
  }
  out.mse = squared_error / total;
  return out;
}

// ---- reference numbers ----------------------------------------------------------------------

TEST(Codebook, ExactD128FourBitMatchesReference) {
  const Codebook& cb = sphere_codebook(CodebookLaw::exact, 128, 4);
  ASSERT_EQ(cb.centroids_f64.size(), 16u);
  for (int i = 0; i < 8; ++i) {
    EXPECT_TRUE(close(cb.centroids_f64[8 + i], kExact128FourBit[i], 2e-6, 0)) << "centroid " << i;
  }
  // The mis-scaling bug (sigma = 1/sqrt(2d)) puts the outer centroid at 0.174.
  EXPECT_GT(cb.centroids_f64.back(), 0.2);
  EXPECT_TRUE(close(cb.centroids.back(), 0.237664, 2e-6, 0));
}

TEST(Codebook, GaussCentroidsAreStandardNormalLloydMaxScaled) {
  for (int dim : {8, 128, 1000}) {
    for (int bits = 1; bits <= 4; ++bits) {
      SCOPED_TRACE(describe(CodebookLaw::gauss, dim, bits));
      const Codebook& cb = sphere_codebook(CodebookLaw::gauss, dim, bits);
      const std::vector<double>& ref = kStandardNormalCentroids[bits - 1];
      const size_t half = ref.size();
      ASSERT_EQ(cb.centroids_f64.size(), 2 * half);
      for (size_t i = 0; i < half; ++i) {
        EXPECT_TRUE(close(cb.centroids_f64[half + i] * std::sqrt(double(dim)), ref[i], 1e-7, 0))
            << "centroid " << i;
      }
    }
  }
}

TEST(Codebook, DistortionMatchesReferenceTable) {
  // The table gives 4-5 significant digits; 2e-4 relative covers its rounding.
  for (int bits = 1; bits <= 4; ++bits) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    const auto d_mse = [&](CodebookLaw law, int dim) {
      return dim * sphere_codebook(law, dim, bits).mse_per_coord;
    };
    EXPECT_TRUE(close(d_mse(CodebookLaw::exact, 64), kExact64Distortion[bits - 1], 0, 2e-4));
    EXPECT_TRUE(close(d_mse(CodebookLaw::exact, 128), kExact128Distortion[bits - 1], 0, 2e-4));
    EXPECT_TRUE(close(d_mse(CodebookLaw::exact, 256), kExact256Distortion[bits - 1], 0, 2e-4));
    EXPECT_TRUE(close(d_mse(CodebookLaw::gauss, 128), kGaussDistortion[bits - 1], 0, 2e-4));
    // Under the Gauss law d * D_mse does not depend on d.
    EXPECT_TRUE(close(d_mse(CodebookLaw::gauss, 64), d_mse(CodebookLaw::gauss, 4096), 0, 1e-12));
  }
}

TEST(Codebook, OneBitClosedForms) {
  // Exact law: c = E|t| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)), D = 1/d - c^2.
  for (int dim : {8, 9, 64, 128, 1001, 4096}) {
    SCOPED_TRACE(describe(CodebookLaw::exact, dim, 1));
    const Codebook& cb = sphere_codebook(CodebookLaw::exact, dim, 1);
    const double c =
        std::exp(std::lgamma(0.5 * dim) - std::lgamma(0.5 * (dim + 1))) / std::sqrt(kPi);
    EXPECT_TRUE(close(cb.centroids_f64[1], c, 0, 1e-11));
    EXPECT_TRUE(close(cb.mse_per_coord, 1.0 / dim - c * c, 0, 1e-9));
  }
  // Gauss: c = sqrt(2/pi) / sqrt(d), D = (1 - 2/pi) / d.
  const Codebook& g = sphere_codebook(CodebookLaw::gauss, 100, 1);
  EXPECT_TRUE(close(g.centroids_f64[1], std::sqrt(2 / kPi) / 10, 0, 1e-14));
  EXPECT_TRUE(close(g.mse_per_coord, (1 - 2 / kPi) / 100, 0, 1e-12));
  // Polar level 2 (density 2 sin(2 psi) on each half): centroids 1/2 and pi/2 - 1/2,
  // D = pi/4 - 3/4.
  const Codebook& p = polar_angle_codebook(2, 1);
  EXPECT_TRUE(close(p.centroids_f64[0], 0.5, 1e-15, 0));
  EXPECT_TRUE(close(p.centroids_f64[1], kPi / 2 - 0.5, 1e-15, 0));
  EXPECT_TRUE(close(p.mse_per_coord, kPi / 4 - 0.75, 0, 1e-12));
}

// ---- structure ------------------------------------------------------------------------------

void expect_well_formed(const Codebook& cb, CodebookLaw law, int dim, int bits) {
  const size_t k = size_t{1} << bits;
  EXPECT_EQ(cb.law, law);
  EXPECT_EQ(cb.dim, dim);
  EXPECT_EQ(cb.bits, bits);
  ASSERT_EQ(cb.centroids_f64.size(), k);
  ASSERT_EQ(cb.centroids.size(), k);
  ASSERT_EQ(cb.boundaries.size(), k - 1);
  for (size_t i = 0; i < k; ++i) {
    EXPECT_EQ(cb.centroids[i], static_cast<float>(cb.centroids_f64[i])) << i;
    if (i > 0) {
      EXPECT_LT(cb.centroids_f64[i - 1], cb.centroids_f64[i]) << i;
      EXPECT_LT(cb.centroids[i - 1], cb.centroids[i]) << i;  // still distinct in float
    }
  }
  for (size_t j = 0; j + 1 < k; ++j) {
    const double mid = 0.5 * (cb.centroids_f64[j] + cb.centroids_f64[j + 1]);
    EXPECT_EQ(cb.boundaries[j], static_cast<float>(mid)) << j;
    EXPECT_LE(cb.centroids[j], cb.boundaries[j]) << j;
    EXPECT_LE(cb.boundaries[j], cb.centroids[j + 1]) << j;
  }
  EXPECT_GT(cb.mse_per_coord, 0);
  switch (law) {
    case CodebookLaw::exact:
    case CodebookLaw::gauss:
      for (size_t i = 0; i < k; ++i) {
        EXPECT_EQ(cb.centroids_f64[i], -cb.centroids_f64[k - 1 - i]) << i;  // bit-exact
        EXPECT_EQ(cb.centroids[i], -cb.centroids[k - 1 - i]) << i;
      }
      EXPECT_EQ(cb.boundaries[k / 2 - 1], 0.0f);
      if (law == CodebookLaw::exact) {
        EXPECT_LT(cb.centroids_f64.back(), 1.0);
      }
      EXPECT_LT(cb.mse_per_coord, 1.0 / dim);
      break;
    case CodebookLaw::polar_angle:
      EXPECT_GT(cb.centroids_f64.front(), 0.0);
      if (dim == 1) {
        EXPECT_LT(cb.centroids_f64.back(), 2 * kPi);
      } else {
        EXPECT_LT(cb.centroids_f64.back(), kPi / 2);
        for (size_t i = 0; i < k; ++i) {  // symmetric about pi/4
          EXPECT_TRUE(close(cb.centroids_f64[i] + cb.centroids_f64[k - 1 - i], kPi / 2, 1e-15, 0))
              << i;
        }
      }
      break;
  }
}

TEST(Codebook, WellFormedForEveryLawAndWidth) {
  struct Case {
    CodebookLaw law;
    std::vector<int> dims;
  };
  const std::vector<Case> cases = {
      {CodebookLaw::exact, {8, 9, 64, 127, 128, 4096}},
      {CodebookLaw::gauss, {8, 128}},
      {CodebookLaw::polar_angle, {1, 2, 3, 8, 16}},
  };
  for (const Case& c : cases) {
    for (int dim : c.dims) {
      for (int bits = 1; bits <= 8; ++bits) {
        SCOPED_TRACE(describe(c.law, dim, bits));
        expect_well_formed(sphere_codebook(c.law, dim, bits), c.law, dim, bits);
      }
    }
  }
}

TEST(Codebook, CentroidsAreConditionalMeansOfTheirCells) {
  struct Case {
    CodebookLaw law;
    int dim;
    std::vector<int> bits;
  };
  const std::vector<Case> cases = {
      {CodebookLaw::exact, 8, {1, 2, 4, 8}},     {CodebookLaw::exact, 128, {1, 3, 4, 8}},
      {CodebookLaw::exact, 4096, {2, 5, 8}},     {CodebookLaw::gauss, 128, {1, 4, 8}},
      {CodebookLaw::polar_angle, 2, {1, 3, 8}},  {CodebookLaw::polar_angle, 5, {2, 6}},
      {CodebookLaw::polar_angle, 16, {1, 4, 8}},
  };
  for (const Case& c : cases) {
    const Law law = law_of(c.law, c.dim);
    for (int bits : c.bits) {
      SCOPED_TRACE(describe(c.law, c.dim, bits));
      const Codebook& cb = sphere_codebook(c.law, c.dim, bits);
      const CellMoments cells = integrate_cells(law, cb.centroids_f64);
      for (size_t i = 0; i < cb.centroids_f64.size(); ++i) {
        EXPECT_TRUE(close(cb.centroids_f64[i], cells.mean[i], 1e-7 * law.sigma, 0)) << "cell " << i;
      }
      EXPECT_TRUE(close(cb.mse_per_coord, cells.mse, 0, 1e-7));
    }
  }
}

// ---- limits and rates -----------------------------------------------------------------------

TEST(Codebook, ExactLawApproachesGaussAsDimensionGrows) {
  for (int bits = 1; bits <= 8; ++bits) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    const Codebook& gauss = sphere_codebook(CodebookLaw::gauss, 128, bits);
    const double gauss_d_mse = 128 * gauss.mse_per_coord;
    double previous_gap = HUGE_VAL;
    for (int dim : {64, 256, 1024, 4096}) {
      const Codebook& exact = sphere_codebook(CodebookLaw::exact, dim, bits);
      // The exact law has lighter tails: lower distortion, approaching the Gauss limit from
      // below with a gap of order 1/d.
      const double gap = gauss_d_mse - dim * exact.mse_per_coord;
      EXPECT_GT(gap, 0) << "dim " << dim;
      EXPECT_LT(gap, previous_gap / 3) << "dim " << dim;
      previous_gap = gap;
    }
    EXPECT_LT(previous_gap, 1e-3 * gauss_d_mse);
    // Centroids in units of 1/sqrt(d) agree to O(1/d) as well (the outer ones, deepest in the
    // tail, differ most: 1.4e-3 relative at 8 bits).
    const Codebook& exact = sphere_codebook(CodebookLaw::exact, 4096, bits);
    for (size_t i = 0; i < gauss.centroids_f64.size(); ++i) {
      const double z_gauss = gauss.centroids_f64[i] * std::sqrt(128.0);
      const double z_exact = exact.centroids_f64[i] * 64.0;
      EXPECT_TRUE(close(z_exact, z_gauss, 1e-6, 2e-3)) << "centroid " << i;
    }
  }
}

TEST(Codebook, HighWidthsConvergeAndDistortionFallsLikeFourToTheMinusBits) {
  // The solver's hard cap is 500 updates; its Newton iteration needs about 4, so a count
  // anywhere near the cap means it stalled.
  const double panter_dite = std::sqrt(3.0) * kPi / 2;  // the 4^-b constant as b -> infinity
  for (CodebookLaw law : {CodebookLaw::exact, CodebookLaw::gauss}) {
    double previous = 0;
    for (int bits = 1; bits <= 8; ++bits) {
      SCOPED_TRACE(describe(law, 128, bits));
      const Codebook& cb = sphere_codebook(law, 128, bits);
      EXPECT_GE(cb.iterations, 1);
      EXPECT_LE(cb.iterations, 20);
      const double d_mse = 128 * cb.mse_per_coord;
      const double normalized = d_mse * std::ldexp(1.0, 2 * bits);  // d * D * 4^b
      EXPECT_GT(normalized, 1.4);
      EXPECT_LT(normalized, panter_dite);
      if (bits > 1) EXPECT_GT(normalized, previous);  // rises towards the Panter-Dite constant
      if (bits >= 5) {
        const double ratio = 128 * sphere_codebook(law, 128, bits - 1).mse_per_coord / d_mse;
        EXPECT_GT(ratio, 3.7);
        EXPECT_LT(ratio, 4.0);
      }
      previous = normalized;
    }
  }
  for (int level : {2, 16}) {
    for (int bits = 5; bits <= 8; ++bits) {
      SCOPED_TRACE(describe(CodebookLaw::polar_angle, level, bits));
      const Codebook& cb = polar_angle_codebook(level, bits);
      EXPECT_GE(cb.iterations, 1);
      EXPECT_LE(cb.iterations, 20);
      const double ratio = polar_angle_codebook(level, bits - 1).mse_per_coord / cb.mse_per_coord;
      EXPECT_GT(ratio, 3.7);
      EXPECT_LT(ratio, 4.1);
    }
  }
}

// ---- polar angles ---------------------------------------------------------------------------

TEST(Codebook, PolarLevelOneIsUniformOnTheCircle) {
  for (int bits = 1; bits <= 8; ++bits) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    const Codebook& cb = polar_angle_codebook(1, bits);
    const int k = 1 << bits;
    const double width = 2 * kPi / k;
    for (int i = 0; i < k; ++i) {
      EXPECT_TRUE(close(cb.centroids_f64[i], (i + 0.5) * width, 1e-15, 0)) << i;
    }
    for (int j = 0; j + 1 < k; ++j) {
      EXPECT_TRUE(close(cb.boundaries[j], (j + 1) * width, 0, 1e-7)) << j;
    }
    EXPECT_TRUE(close(cb.mse_per_coord, width * width / 12, 0, 1e-14));
    EXPECT_EQ(cb.iterations, 0);  // closed form
  }
}

TEST(Codebook, PolarAnglesConcentrateAtQuarterPiAsLevelsGrow) {
  // The level-l angle has standard deviation ~ 1/(2 sqrt(n - 1)), n = 2^(l-1): the codebook
  // spread shrinks accordingly.
  double previous_spread = HUGE_VAL;
  for (int level = 2; level <= 16; ++level) {
    SCOPED_TRACE("level " + std::to_string(level));
    const Codebook& cb = polar_angle_codebook(level, 3);
    const double spread = cb.centroids_f64.back() - cb.centroids_f64.front();
    EXPECT_LT(spread, previous_spread);
    if (level >= 6) {  // near-Gaussian: 3-bit outer centroid at 2.152 sigma
      const double sigma = 0.5 / std::sqrt(std::ldexp(1.0, level - 1) - 1);
      EXPECT_TRUE(close(cb.centroids_f64.back() - kPi / 4, 2.1519457045 * sigma, 0, 0.05));
    }
    previous_spread = spread;
  }
}

// ---- errors, cache, determinism -------------------------------------------------------------

TEST(Codebook, BadInputThrows) {
  for (CodebookLaw law : {CodebookLaw::exact, CodebookLaw::gauss}) {
    for (int dim : {7, 1, 0, -3}) {
      EXPECT_THROW(compute_codebook(law, dim, 4), Error) << dim;
      EXPECT_THROW(sphere_codebook(law, dim, 4), Error) << dim;
    }
    for (int bits : {0, 9, -1, 16}) {
      EXPECT_THROW(compute_codebook(law, 128, bits), Error) << bits;
      EXPECT_THROW(sphere_codebook(law, 128, bits), Error) << bits;
    }
  }
  for (int level : {0, -1, 17}) {
    EXPECT_THROW(polar_angle_codebook(level, 4), Error) << level;
    EXPECT_THROW(compute_codebook(CodebookLaw::polar_angle, level, 4), Error) << level;
  }
  EXPECT_THROW(polar_angle_codebook(3, 0), Error);
  EXPECT_THROW(polar_angle_codebook(3, 9), Error);
  EXPECT_THROW(compute_codebook(static_cast<CodebookLaw>(42), 128, 4), Error);

  // Messages name the bad value and the valid range.
  const std::string dim_msg = test::error_message([] { sphere_codebook(CodebookLaw::exact, 7, 4); });
  EXPECT_NE(dim_msg.find("dim"), std::string::npos) << dim_msg;
  EXPECT_NE(dim_msg.find(">= 8"), std::string::npos) << dim_msg;
  EXPECT_NE(dim_msg.find("7"), std::string::npos) << dim_msg;
  const std::string bits_msg = test::error_message([] { sphere_codebook(CodebookLaw::gauss, 64, 9); });
  EXPECT_NE(bits_msg.find("1..8"), std::string::npos) << bits_msg;
  EXPECT_NE(bits_msg.find("9"), std::string::npos) << bits_msg;
  const std::string level_msg = test::error_message([] { polar_angle_codebook(17, 4); });
  EXPECT_NE(level_msg.find("level"), std::string::npos) << level_msg;
  EXPECT_NE(level_msg.find("1..16"), std::string::npos) << level_msg;
  EXPECT_NE(level_msg.find("17"), std::string::npos) << level_msg;
}

TEST(Codebook, ComputationIsDeterministic) {
  for (CodebookLaw law : {CodebookLaw::exact, CodebookLaw::gauss, CodebookLaw::polar_angle}) {
    const int dim = law == CodebookLaw::polar_angle ? 7 : 96;
    for (int bits : {3, 8}) {
      SCOPED_TRACE(describe(law, dim, bits));
      const Codebook a = compute_codebook(law, dim, bits);
      const Codebook b = compute_codebook(law, dim, bits);
      EXPECT_EQ(a.centroids_f64, b.centroids_f64);
      EXPECT_EQ(a.boundaries, b.boundaries);
      EXPECT_EQ(a.mse_per_coord, b.mse_per_coord);
      EXPECT_EQ(a.iterations, b.iterations);
      const Codebook& cached = sphere_codebook(law, dim, bits);
      EXPECT_EQ(cached.centroids_f64, a.centroids_f64);
      EXPECT_EQ(cached.mse_per_coord, a.mse_per_coord);
    }
  }
}

TEST(Codebook, CacheReturnsOneStableEntryPerKeyAcrossThreads) {
  const Codebook* first = &sphere_codebook(CodebookLaw::exact, 200, 5);
  EXPECT_EQ(first, &sphere_codebook(CodebookLaw::exact, 200, 5));
  EXPECT_NE(first, &sphere_codebook(CodebookLaw::gauss, 200, 5));
  EXPECT_NE(first, &sphere_codebook(CodebookLaw::exact, 200, 6));
  EXPECT_EQ(&polar_angle_codebook(4, 3), &sphere_codebook(CodebookLaw::polar_angle, 4, 3));

  // Many threads racing on fresh keys all get the same entries.
  constexpr int kThreads = 8;
  std::vector<std::vector<const Codebook*>> seen(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t, &seen] {
      for (int bits = 1; bits <= 8; ++bits) {
        seen[t].push_back(&sphere_codebook(CodebookLaw::exact, 333, bits));
        seen[t].push_back(&sphere_codebook(CodebookLaw::gauss, 333, bits));
        seen[t].push_back(&polar_angle_codebook(9, bits));
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 1; t < kThreads; ++t) EXPECT_EQ(seen[t], seen[0]) << "thread " << t;
  for (const Codebook* cb : seen[0]) {
    expect_well_formed(*cb, cb->law, cb->dim, cb->bits);
  }
}

}  // namespace
}  // namespace tq
