// Lloyd-Max optimal scalar codebooks.
//
// TurboQuant rotates a vector so that each coordinate of the unit vector
// u = Rx/|x| follows the law of one coordinate of a uniform random point on
// the sphere S^{d-1}: density proportional to (1 - t^2)^((d-3)/2) on [-1, 1],
// i.e. (t+1)/2 ~ Beta((d-1)/2, (d-1)/2). Its variance is exactly 1/d, so the
// Gaussian limit is N(0, 1/d): sigma = 1/sqrt(d). (Public ports that used
// 1/sqrt(2d) put the 4-bit outer centroid at 0.174 instead of 0.2377 for
// d = 128 -- a test guards against that.)
//
// PolarQuant needs codebooks for its angles: level 1 angles are uniform on
// [0, 2pi); the level-l angle (l >= 2) between two sub-vector norms of
// n = 2^(l-1) coordinates each has density proportional to sin(2 psi)^(n-1)
// on [0, pi/2].
//
// Codebooks are computed deterministically (double precision, fixed
// iteration rules) and cached per (law, dim, bits); the cache is thread-safe
// and entries live for the whole program.
//
//   const tq::Codebook& cb = tq::sphere_codebook(tq::CodebookLaw::exact, 128, 4);
//   cb.centroids.back();  // 0.237664
#pragma once

#include <vector>

namespace tq {

enum class CodebookLaw {
  exact,        // one coordinate of a uniform unit vector in R^dim
  gauss,        // its N(0, 1/dim) limit
  polar_angle,  // PolarQuant angle at level `dim` (1 = uniform circle)
};

struct Codebook {
  CodebookLaw law = CodebookLaw::exact;
  int dim = 0;    // vector dimension (exact, gauss) or polar level (polar_angle)
  int bits = 0;   // 1..8; 2^bits centroids
  std::vector<double> centroids_f64;  // ascending
  std::vector<float> centroids;       // the same, rounded to float (kernels use these)
  std::vector<float> boundaries;      // 2^bits - 1 ascending midpoints between centroids
  double mse_per_coord = 0;  // E[(t - q(t))^2] under the law (per coordinate)
  int iterations = 0;        // Newton/Lloyd updates used to converge (0: closed form)
};

// Cached; throws tq::Error for dim < 8 (exact/gauss), a level outside 1..16
// (polar_angle), or bits outside 1..8. sphere_codebook(polar_angle, level, b)
// is the same cached object as polar_angle_codebook(level, b).
const Codebook& sphere_codebook(CodebookLaw law, int dim, int bits);
const Codebook& polar_angle_codebook(int level, int bits);

// Uncached computation (what the cache calls).
Codebook compute_codebook(CodebookLaw law, int dim, int bits);

}  // namespace tq
