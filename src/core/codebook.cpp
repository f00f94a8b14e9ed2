// Lloyd-Max codebooks for the laws documented in codebook.hpp.
//
// Every law handled by the solver is symmetric about 0 in a working variable x:
//   exact        x = t, density (1 - t^2)^(alpha - 1) on [-1, 1], alpha = (dim - 1) / 2;
//   gauss        x = z = t * sqrt(dim), standard normal (scaled back at the end);
//   polar_angle  x = u = 2 psi - pi/2 for level >= 2, density cos(u)^(n - 1) on [-pi/2, pi/2]
//                (sin(2 psi) = cos(u)); level 1 (uniform circle) is closed form.
// With 2^bits levels (an even count) the middle boundary is exactly 0, so we solve for the
// positive half only and mirror it: centroids[i] == -centroids[K-1-i] holds bit-exactly.
//
// Cell masses and means: interior cells by composite Gauss-Legendre quadrature (exact to
// rounding for these smooth densities, and free of the cancellation that a difference of two
// CDF values suffers in a narrow cell); the unbounded outer cell by exact primitives (the
// incomplete beta from its continued fraction for the exact law, erfc and phi for gauss).
//
// The Lloyd fixed point c = m(c) (boundaries at midpoints, centroids at conditional means) is
// solved by Newton's method. Cell i moves only with boundaries i and i+1, so the Jacobian of m
// is tridiagonal and a Newton step costs O(K). Plain Lloyd converges linearly with a rate that
// tends to 1 as K grows (to 1e-13 at d = 128 it takes 690 iterations at 4 bits and ~108,000 at
// 8 bits); Newton from the companding initialization (quantiles of density^(1/3)) takes 4. The
// densities are log-concave, so dm_i/d(shift of cell i) < 1 and the Newton matrix is diagonally
// dominant: the tridiagonal solve needs no pivoting. Everything is double precision with a fixed
// sequence of operations, hence deterministic.
#include "turboquant/codebook.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numbers>
#include <tuple>
#include <utility>
#include <vector>

#include "turboquant/error.hpp"

namespace tq {
namespace {

constexpr double kPi = std::numbers::pi;
constexpr int kMaxIterations = 500;   // hard cap on Newton/Lloyd updates
constexpr double kTolerance = 1e-13;  // largest Lloyd update at convergence, / the law's scale
constexpr int kMaxLevel = 16;         // polar levels: n = 2^(level-1) <= 32768 coordinates

// ---- regularized incomplete beta ------------------------------------------------------------

// Continued fraction K(x) with I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / K(x), where
//   K = 1 + d1/(1 + d2/(1 + ...)),
//   d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),  d_{2m} = m(b-m) x / ((a+2m-1)(a+2m)).
// It converges fast for x < (a+1)/(a+b+2); callers use it only for x <= 1/2 with a == b (the
// lower tail), where that holds, and get the upper tail by symmetry -- never as 1 - I, which
// would cancel. Near x = 1/2 it needs O(sqrt(a)) terms.
double beta_cf_term(int j, double x, double a, double b) {
  const int m = j / 2;
  return (j % 2 == 1) ? -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
                      : m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m));
}

// The modified Lentz method (forward) finds how many terms are needed; the value is then
// evaluated backwards from twice that depth. The forward products accumulate rounding
// (1e-14 relative at a ~ 2000, 5e-14 at a ~ 30000), the backward recurrence damps it (3e-15).
double beta_cf_denominator(double x, double a, double b) {
  constexpr double kTiny = 1e-300;
  constexpr int kMaxTerms = 10000000;
  double c = 1.0;
  double d = 0.0;
  int depth = 0;
  for (int j = 1; j <= kMaxTerms && depth == 0; ++j) {
    const double dj = beta_cf_term(j, x, a, b);
    d = 1.0 + dj * d;
    if (std::fabs(d) < kTiny) d = kTiny;
    c = 1.0 + dj / c;
    if (std::fabs(c) < kTiny) c = kTiny;
    d = 1.0 / d;
    if (std::fabs(c * d - 1.0) < 1e-16) depth = j;
  }
  TQ_ASSERT(depth > 0);  // converges for every x <= 1/2 used here
  double k = 1.0;
  for (int j = 2 * depth; j >= 1; --j) k = 1.0 + beta_cf_term(j, x, a, b) / k;
  return k;
}

// ---- quadrature -----------------------------------------------------------------------------

// Gauss-Legendre rule on [-1, 1]; nodes by Newton's method on P_N with the three-term
// recurrence, weights 2 / ((1 - x^2) P_N'(x)^2).
constexpr int kLegendreNodes = 20;
struct LegendreRule {
  double x[kLegendreNodes];
  double w[kLegendreNodes];
};

const LegendreRule& legendre_rule() {
  static const LegendreRule rule = [] {
    constexpr int n = kLegendreNodes;
    LegendreRule r{};
    // P_n(x) and P_n'(x).
    const auto legendre = [](double x, double* dp) {
      double p0 = 1.0, p1 = x;
      for (int k = 2; k <= n; ++k) {
        const double p2 = ((2 * k - 1) * x * p1 - (k - 1) * p0) / k;
        p0 = p1;
        p1 = p2;
      }
      *dp = n * (x * p1 - p0) / (x * x - 1.0);
      return p1;
    };
    for (int i = 0; i < n; ++i) {
      double x = std::cos(kPi * (i + 0.75) / (n + 0.5));  // classic first guess
      double dp = 0;
      for (int iter = 0; iter < 100; ++iter) {
        const double dx = legendre(x, &dp) / dp;
        x -= dx;
        if (std::fabs(dx) < 1e-15) break;
      }
      legendre(x, &dp);
      r.x[i] = x;
      r.w[i] = 2.0 / ((1.0 - x * x) * dp * dp);
    }
    return r;
  }();
  return rule;
}

// Calls fn(x, weight) for a composite Gauss-Legendre rule on [a, b], panels no wider than
// max_panel.
template <class Fn>
void for_each_node(double a, double b, double max_panel, Fn&& fn) {
  if (!(b > a)) return;
  const LegendreRule& rule = legendre_rule();
  const int panels = std::max(1, static_cast<int>(std::ceil((b - a) / max_panel)));
  for (int k = 0; k < panels; ++k) {
    const double lo = a + (b - a) * k / panels;
    const double hi = (k + 1 == panels) ? b : a + (b - a) * (k + 1) / panels;
    const double mid = 0.5 * (lo + hi), half = 0.5 * (hi - lo);
    for (int q = 0; q < kLegendreNodes; ++q) fn(mid + half * rule.x[q], half * rule.w[q]);
  }
}

// Unnormalized mass and conditional mean of the cell [lo, hi] under the density `shape`.
// The mean is accumulated as lo + E[x - lo | cell], so rounding in the density values moves it
// in proportion to the cell width rather than to |x|: the Lloyd residual stays near one ulp,
// which matters because at 8 bits the fixed point amplifies residual noise ~100-fold.
template <class Shape>
void quadrature_cell(double lo, double hi, double max_panel, const Shape& shape, double* mass,
                     double* mean) {
  double sum = 0, first = 0;
  for_each_node(lo, hi, max_panel, [&](double x, double w) {
    const double f = w * shape(x);
    sum += f;
    first += f * (x - lo);
  });
  *mass = sum;
  *mean = lo + first / sum;
}

// ---- the three laws, positive half ----------------------------------------------------------
//
// Each law provides, in its working variable x >= 0:
//   scale()          typical spread (convergence tolerance, initialization grid);
//   upper()          end of the support used for the last cell (may be +inf);
//   log_shape(x)     log of the unnormalized density (initialization only);
//   density(x)       normalized density of the full symmetric law;
//   cells(b, p, m)   for boundaries 0 = b[0] < ... < b[h]: cell masses p[i] (of the full law,
//                    so they sum to 1/2) and conditional means m[i].

// Exact law of one coordinate of a uniform point on S^{dim-1}, x = t in [0, 1].
// Normalizer Z = int_{-1}^{1} (1 - t^2)^(alpha - 1) dt
//              = sqrt(pi) Gamma(alpha) / Gamma(alpha + 1/2).
// Exact primitives:
//   int_t^1 s (1 - s^2)^(alpha - 1) ds / Z = (1 - t^2)^alpha / (2 alpha Z) =: g(t),
//   P(T > t) = I_{(1-t)/2}(alpha, alpha) = g(t) / K((1-t)/2)   (the prefactor of I is g as well).
// Everything goes through logs, so dim = 4096 (alpha ~ 2048) does not underflow.
class ExactHalf {
 public:
  explicit ExactHalf(int dim) : alpha_(0.5 * (dim - 1)), dim_(dim) {
    log_z_ = log_normalizer(alpha_);
    log_2alpha_z_ = std::log(2.0 * alpha_) + log_z_;
  }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(dim_)); }
  double upper() const { return 1.0; }
  double second_moment() const { return 1.0 / dim_; }
  double log_shape(double t) const { return (alpha_ - 1.0) * std::log1p(-t * t); }
  double density(double t) const {
    if (t >= 1.0) return 0.0;
    return std::exp((alpha_ - 1.0) * std::log1p(-t * t) - log_z_);
  }
  void cells(const std::vector<double>& b, std::vector<double>* p, std::vector<double>* m) const {
    // Interior cells by quadrature: as a difference of two CDF values the mass of a narrow
    // cell loses up to 7 bits (S ~ 0.5 against P ~ 0.004 at 8 bits), which left a noise floor
    // of ~2e-13 (relative to the scale) on the Lloyd residual. The outer cell is a pure tail
    // and takes the exact primitives (incomplete beta and the closed-form first moment).
    const size_t last = p->size() - 1;
    const auto f = [this](double t) { return density(t); };
    for (size_t i = 0; i < last; ++i)
      quadrature_cell(b[i], b[i + 1], 0.5 * scale(), f, &(*p)[i], &(*m)[i]);
    upper_tail(b[last], &(*p)[last], &(*m)[last]);
  }

 private:
  // P(T > t) and E[T | T > t] for 0 <= t < 1. With g(t) = E[T; T > t], the mirror image of the
  // lower tail gives P(T > t) = I_{(1-t)/2}(alpha, alpha) = g(t) / K((1-t)/2), so the
  // conditional mean is K itself -- no exp, no division that could cancel.
  void upper_tail(double t, double* mass, double* mean) const {
    if (t == 0.0) {
      *mass = 0.5;
      *mean = 2.0 * std::exp(-log_2alpha_z_);  // g(0) / (1/2)
      return;
    }
    const double k = beta_cf_denominator(0.5 * (1.0 - t), alpha_, alpha_);
    *mass = std::exp(alpha_ * std::log1p(-t * t) - log_2alpha_z_) / k;
    *mean = k;
  }

  // log Z(alpha); alpha is a multiple of 1/2. A difference of lgamma values would lose ~1e-12
  // at alpha ~ 2000, so for moderate alpha use the exact recurrence
  // Z(alpha + 1) = Z(alpha) alpha / (alpha + 1/2) from Z(1/2) = pi or Z(1) = 2, and for large
  // alpha the asymptotic series log(Gamma(a + 1/2) / Gamma(a)) = log(a)/2 - 1/(8a) + 1/(192a^3)
  // + O(a^-5), whose remainder is below 1e-20 there.
  static double log_normalizer(double alpha) {
    if (alpha <= 1e4) {
      const bool integer = std::floor(alpha) == alpha;
      double a = integer ? 1.0 : 0.5;
      double z = integer ? 2.0 : kPi;
      for (; a < alpha; a += 1.0) z *= a / (a + 0.5);
      return std::log(z);
    }
    const double log_ratio =
        0.5 * std::log(alpha) - 1.0 / (8.0 * alpha) + 1.0 / (192.0 * alpha * alpha * alpha);
    return 0.5 * std::log(kPi) - log_ratio;
  }

  double alpha_;
  int dim_;
  double log_z_ = 0;
  double log_2alpha_z_ = 0;
};

// Standard normal, x = z; the caller scales by 1/sqrt(dim). Phi via erfc (no cancellation in
// the upper tail) and int_z^inf s phi(s) ds = phi(z).
class GaussHalf {
 public:
  double scale() const { return 1.0; }
  double upper() const { return std::numeric_limits<double>::infinity(); }
  double second_moment() const { return 1.0; }
  double log_shape(double z) const { return -0.5 * z * z; }
  double density(double z) const { return kInvSqrt2Pi * std::exp(-0.5 * z * z); }
  void cells(const std::vector<double>& b, std::vector<double>* p, std::vector<double>* m) const {
    // Interior cells by quadrature, as for the exact law; the outer tail in closed form.
    const size_t last = p->size() - 1;
    const auto f = [this](double z) { return density(z); };
    for (size_t i = 0; i < last; ++i) quadrature_cell(b[i], b[i + 1], 0.5, f, &(*p)[i], &(*m)[i]);
    (*p)[last] = 0.5 * std::erfc(b[last] * (1.0 / std::numbers::sqrt2));
    (*m)[last] = density(b[last]) / (*p)[last];
  }

 private:
  static constexpr double kInvSqrt2Pi = 0.5 * std::numbers::inv_sqrtpi * std::numbers::sqrt2;
};

// PolarQuant angle at level >= 2 in u = 2 psi - pi/2: density proportional to cos(u)^(n-1) on
// [-pi/2, pi/2], n = 2^(level-1). It is close to N(0, 1/(n-1)) for large n, so integrals are
// cut at 30 standard deviations (the density there is below e^-450 of its peak) and panels are
// half a standard deviation wide: with 20 nodes each, the quadrature is exact to rounding.
class PolarHalf {
 public:
  explicit PolarHalf(int level)
      : power_(std::ldexp(1.0, level - 1) - 1.0),
        scale_(1.0 / std::sqrt(power_)),
        cut_(std::min(0.5 * kPi, 30.0 * scale_)),
        panel_(0.5 * scale_) {
    double z = 0;
    for_each_node(0.0, cut_, panel_, [&](double u, double w) { z += w * shape(u); });
    inv_z_ = 0.5 / z;  // the positive half carries mass 1/2
  }
  double scale() const { return scale_; }
  double upper() const { return cut_; }
  double log_shape(double u) const { return power_ * log_cos(u); }
  double density(double u) const { return u >= cut_ ? 0.0 : inv_z_ * shape(u); }
  void cells(const std::vector<double>& b, std::vector<double>* p, std::vector<double>* m) const {
    const auto f = [this](double u) { return shape(u); };
    for (size_t i = 0; i < p->size(); ++i) {
      quadrature_cell(b[i], std::min(b[i + 1], cut_), panel_, f, &(*p)[i], &(*m)[i]);
      (*p)[i] *= inv_z_;
    }
  }
  // E[(u - q(u))^2] over the full law for the positive-half centroids c and boundaries b, by
  // direct quadrature (no cancellation).
  double mse(const std::vector<double>& b, const std::vector<double>& c) const {
    double sum = 0;
    for (size_t i = 0; i < c.size(); ++i) {
      for_each_node(b[i], std::min(b[i + 1], cut_), panel_,
                    [&](double u, double w) { sum += w * shape(u) * (u - c[i]) * (u - c[i]); });
    }
    return 2.0 * sum * inv_z_;
  }

 private:
  // cos(u) = 1 - 2 sin^2(u/2): log(cos u) through log1p keeps full relative accuracy near
  // u = 0, where a rounded cos(u) would be off by 1e-16 absolute and, raised to the power
  // n - 1 = 32767, by 4e-12 relative.
  static double log_cos(double u) {
    const double s = std::sin(0.5 * u);
    const double one_minus_cos = 2.0 * s * s;
    return one_minus_cos < 1.0 ? std::log1p(-one_minus_cos)
                               : -std::numeric_limits<double>::infinity();
  }
  double shape(double u) const { return std::exp(power_ * log_cos(u)); }

  double power_;  // n - 1
  double scale_;  // 1 / sqrt(n - 1), the limiting standard deviation
  double cut_;
  double panel_;
  double inv_z_ = 0;
};

// ---- the solver -----------------------------------------------------------------------------

// Asymptotically optimal companding: centroids at the quantiles (i + 1/2) / h of the positive
// half of density^(1/3), from a trapezoid table (an initial guess only; Newton does the rest).
template <class Law>
std::vector<double> companding_init(const Law& law, int half) {
  constexpr int kGrid = 4096;
  const double end = std::min(law.upper(), 15.0 * law.scale());
  std::vector<double> cum(kGrid + 1, 0.0);
  double prev = std::exp(law.log_shape(0.0) / 3.0);
  for (int k = 1; k <= kGrid; ++k) {
    const double cur = std::exp(law.log_shape(end * k / kGrid) / 3.0);
    cum[k] = cum[k - 1] + 0.5 * (prev + cur) * (end / kGrid);
    prev = cur;
  }
  std::vector<double> c(half);
  int k = 1;
  for (int i = 0; i < half; ++i) {
    const double target = (i + 0.5) / half * cum[kGrid];
    while (k < kGrid && cum[k] < target) ++k;
    const double frac = (target - cum[k - 1]) / (cum[k] - cum[k - 1]);
    c[i] = end * (k - 1 + frac) / kGrid;
  }
  return c;
}

// Fills b[1..h-1] with midpoints (b[0] = 0 and b[h] = upper stay as set).
void set_midpoints(const std::vector<double>& c, std::vector<double>* b) {
  for (size_t j = 1; j < c.size(); ++j) (*b)[j] = 0.5 * (c[j - 1] + c[j]);
}

struct HalfSolution {
  std::vector<double> centroids;   // positive half, ascending
  std::vector<double> boundaries;  // 0, midpoints, upper
  std::vector<double> mass;        // cell masses of the final cells
  std::vector<double> mean;        // conditional means of the final cells
  int iterations = 0;
};

template <class Law>
HalfSolution solve_positive_half(const Law& law, int half) {
  std::vector<double> c = companding_init(law, half);
  std::vector<double> b(half + 1), p(half), m(half);
  std::vector<double> diag(half), lower(half), upper(half), rhs(half), step(half), next(half);
  b[0] = 0.0;
  b[half] = law.upper();
  const double tolerance = kTolerance * law.scale();
  // `iterations` counts updates of c. We stop when the Lloyd update m(c) - c is below the
  // tolerance, i.e. when one more plain Lloyd iteration would change no centroid by more than
  // kTolerance * scale. (The size of the Newton step is not a usable test at 8 bits: the
  // fixed point amplifies the ~1-ulp rounding noise of m(c) about 100-fold, so Newton steps
  // stall around 1e-13 of the scale while the residual sits near 1e-15.)
  // A guard for extreme dims (d ~ 1e6 and beyond), where the rounding floor of m(c) itself
  // nears the tolerance: once the residual is tiny and Newton stops halving it, we are at that
  // floor and further steps only shuffle rounding noise.
  int iterations = 0;
  double previous = std::numeric_limits<double>::infinity();
  for (;;) {
    set_midpoints(c, &b);
    law.cells(b, &p, &m);
    double residual = 0;
    for (int i = 0; i < half; ++i) residual = std::max(residual, std::fabs(m[i] - c[i]));
    if (residual < tolerance || iterations == kMaxIterations) break;
    if (residual < 1e3 * tolerance && residual > 0.5 * previous) break;
    previous = residual;
    ++iterations;
    // Newton on F(c) = c - m(b(c)): (I - dm/dc) step = m - c, with
    //   dm_i/db_i = f(b_i) (m_i - b_i) / p_i,  dm_i/db_{i+1} = f(b_{i+1}) (b_{i+1} - m_i) / p_i,
    // and each interior boundary the midpoint of its two centroids (outer ones are fixed).
    for (int i = 0; i < half; ++i) {
      const double da = i > 0 ? law.density(b[i]) * (m[i] - b[i]) / p[i] : 0.0;
      const double db = i + 1 < half ? law.density(b[i + 1]) * (b[i + 1] - m[i]) / p[i] : 0.0;
      diag[i] = 1.0 - 0.5 * (da + db);
      lower[i] = -0.5 * da;
      upper[i] = -0.5 * db;
      rhs[i] = m[i] - c[i];
    }
    for (int i = 1; i < half; ++i) {  // Thomas algorithm
      const double w = lower[i] / diag[i - 1];
      diag[i] -= w * upper[i - 1];
      rhs[i] -= w * rhs[i - 1];
    }
    step[half - 1] = rhs[half - 1] / diag[half - 1];
    for (int i = half - 2; i >= 0; --i) step[i] = (rhs[i] - upper[i] * step[i + 1]) / diag[i];

    bool ordered = true;
    for (int i = 0; i < half; ++i) {
      next[i] = c[i] + step[i];
      const double below = i > 0 ? next[i - 1] : 0.0;
      if (!(next[i] > below)) ordered = false;
    }
    if (!(next[half - 1] < b[half])) ordered = false;
    // A Newton step that leaves the ordered region falls back to the plain Lloyd step, which
    // always stays inside it (each mean lies strictly within its cell).
    if (!ordered) next = m;
    c.swap(next);
  }
  // The final p and m belong to the final c (the loop exits right after evaluating them).
  return HalfSolution{std::move(c), std::move(b), std::move(p), std::move(m), iterations};
}

// E[x^2] - sum over cells of (2 c_i E[x; cell] - c_i^2 P_i): the exact MSE of the stored
// centroids (it equals E[x^2] - sum P_i c_i^2 at the fixed point).
template <class Law>
double symmetric_mse(const Law& law, const HalfSolution& s) {
  double explained = 0;
  for (size_t i = 0; i < s.centroids.size(); ++i) {
    const double c = s.centroids[i];
    explained += s.mass[i] * (2.0 * c * s.mean[i] - c * c);
  }
  return law.second_moment() - 2.0 * explained;
}

// Full codebook from the positive half: mirror, scale, then map x -> offset + factor * x.
Codebook assemble(CodebookLaw law, int dim, int bits, const std::vector<double>& half_centroids,
                  double offset, double factor) {
  Codebook cb;
  cb.law = law;
  cb.dim = dim;
  cb.bits = bits;
  const size_t h = half_centroids.size();
  cb.centroids_f64.resize(2 * h);
  for (size_t i = 0; i < h; ++i) {
    cb.centroids_f64[h + i] = offset + factor * half_centroids[i];
    cb.centroids_f64[h - 1 - i] = offset - factor * half_centroids[i];
  }
  return cb;
}

void finish(Codebook* cb) {
  const auto& c = cb->centroids_f64;
  cb->centroids.assign(c.begin(), c.end());
  cb->boundaries.resize(c.size() - 1);
  for (size_t j = 0; j + 1 < c.size(); ++j) {
    cb->boundaries[j] = static_cast<float>(0.5 * (c[j] + c[j + 1]));
  }
}

}  // namespace

Codebook compute_codebook(CodebookLaw law, int dim, int bits) {
  TQ_REQUIRE(bits >= 1 && bits <= 8, "compute_codebook: bits must be in 1..8, got ", bits);
  const int levels = 1 << bits;
  const int half = levels / 2;
  Codebook cb;
  switch (law) {
    case CodebookLaw::exact: {
      TQ_REQUIRE(dim >= 8, "compute_codebook: dim must be >= 8 for the exact law, got ", dim);
      const ExactHalf exact(dim);
      const HalfSolution s = solve_positive_half(exact, half);
      cb = assemble(law, dim, bits, s.centroids, 0.0, 1.0);
      cb.mse_per_coord = symmetric_mse(exact, s);
      cb.iterations = s.iterations;
      break;
    }
    case CodebookLaw::gauss: {
      TQ_REQUIRE(dim >= 8, "compute_codebook: dim must be >= 8 for the gauss law, got ", dim);
      const GaussHalf gauss;
      const HalfSolution s = solve_positive_half(gauss, half);
      cb = assemble(law, dim, bits, s.centroids, 0.0, 1.0 / std::sqrt(static_cast<double>(dim)));
      cb.mse_per_coord = symmetric_mse(gauss, s) / dim;
      cb.iterations = s.iterations;
      break;
    }
    case CodebookLaw::polar_angle: {
      TQ_REQUIRE(dim >= 1 && dim <= kMaxLevel, "compute_codebook: polar_angle level must be in 1..",
                 kMaxLevel, ", got ", dim);
      if (dim == 1) {
        // Uniform on the circle: uniform cells are optimal; closed form, no iterations.
        cb.law = law;
        cb.dim = dim;
        cb.bits = bits;
        const double width = 2.0 * kPi / levels;
        cb.centroids_f64.resize(levels);
        for (int k = 0; k < levels; ++k) cb.centroids_f64[k] = (k + 0.5) * width;
        cb.mse_per_coord = width * width / 12.0;
        cb.iterations = 0;
        break;
      }
      const PolarHalf polar(dim);
      const HalfSolution s = solve_positive_half(polar, half);
      cb = assemble(law, dim, bits, s.centroids, 0.25 * kPi, 0.5);  // psi = pi/4 + u/2
      cb.mse_per_coord = 0.25 * polar.mse(s.boundaries, s.centroids);
      cb.iterations = s.iterations;
      break;
    }
    default:
      TQ_THROW("compute_codebook: unknown CodebookLaw value ", static_cast<int>(law));
  }
  finish(&cb);
  return cb;
}

const Codebook& sphere_codebook(CodebookLaw law, int dim, int bits) {
  // Never destroyed, so references stay valid even during static destruction.
  static auto* mutex = new std::mutex;
  static auto* cache = new std::map<std::tuple<int, int, int>, std::unique_ptr<const Codebook>>;
  const auto key = std::make_tuple(static_cast<int>(law), dim, bits);
  {
    std::lock_guard<std::mutex> lock(*mutex);
    const auto it = cache->find(key);
    if (it != cache->end()) return *it->second;
  }
  // Computed outside the lock so that other keys are not held up; if two threads race on the
  // same key, the first insert wins (both results are identical anyway).
  auto computed = std::make_unique<const Codebook>(compute_codebook(law, dim, bits));
  std::lock_guard<std::mutex> lock(*mutex);
  const auto [it, inserted] = cache->try_emplace(key, std::move(computed));
  return *it->second;
}

const Codebook& polar_angle_codebook(int level, int bits) {
  return sphere_codebook(CodebookLaw::polar_angle, level, bits);
}

}  // namespace tq
