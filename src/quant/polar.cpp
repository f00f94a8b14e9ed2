// PolarQuant: rotate, then a recursive polar transform. Level 1 turns each
// coordinate pair into (radius, angle in [0, 2pi)); level l pairs the radii
// of level l-1 into (radius, angle in [0, pi/2]). After L levels only
// dim/2^L radii remain (stored fp16); every angle is coded with a Lloyd-Max
// codebook for its level's exact law (codebook.hpp), bit-packed.
// Angle arithmetic is scalar (libm atan2/cos/sin); the rotation and the
// code search use the SIMD kernels.
#include <cmath>
#include <numbers>

#include "quant/quantizers.hpp"
#include "quant/scratch.hpp"
#include "turboquant/error.hpp"
#include "turboquant/half.hpp"
#include "turboquant/rng.hpp"

namespace tq::quant {

PolarQuantizer::PolarQuantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd)
    : Quantizer(spec, dim, seed, simd),
      k_(kernels::kernels_for(simd)),
      rot_(spec.rotation, dim, derive_seed(seed, "rotation"), simd),
      levels_(spec.polar_levels) {
  size_t off = 0;
  for (int l = 1; l <= levels_; ++l) {
    const int bits = l == 1 ? spec.polar_bits1 : spec.polar_bits;
    cb_.push_back(&polar_angle_codebook(l, bits));
    std::vector<float> c, s;
    for (double a : cb_.back()->centroids_f64) {
      c.push_back(static_cast<float>(std::cos(a)));
      s.push_back(static_cast<float>(std::sin(a)));
    }
    cos_.push_back(std::move(c));
    sin_.push_back(std::move(s));
    level_offset_.push_back(off);
    off += packed_bytes(dim >> l, bits);
  }
  radii_offset_ = off;
}

void PolarQuantizer::encode_one(const float* x, uint8_t* rec) const {
  const int d = dim();
  Scratch s(d);
  checked_norm(k_, x, d);  // rejects NaN/Inf
  rot_.forward(x, s.y);
  float* cur = s.y;  // values of the current level: d, d/2, d/4, ...
  float* ang = s.c;
  float* nxt = s.r;
  for (int l = 1; l <= levels_; ++l) {
    const int n = d >> l;
    for (int i = 0; i < n; ++i) {
      const float a = cur[2 * i], b = cur[2 * i + 1];
      nxt[i] = std::sqrt(a * a + b * b);
      float psi = std::atan2(b, a);  // level >= 2: a, b >= 0 so psi in [0, pi/2]
      if (psi < 0.0f) psi += static_cast<float>(2 * std::numbers::pi);
      ang[i] = psi;
    }
    const int bits = cb_[l - 1]->bits;
    k_.quantize(ang, n, 1.0f, cb_[l - 1]->boundaries.data(), bits, s.codes);
    k_.pack(s.codes, n, bits, rec + level_offset_[l - 1]);
    std::swap(cur, nxt);
  }
  const int n_radii = d >> levels_;
  for (int i = 0; i < n_radii; ++i) {
    TQ_REQUIRE(cur[i] <= kHalfMax, "polar radius ", cur[i], " does not fit fp16 (max 65504)");
    const uint16_t h = float_to_half(cur[i]);
    rec[radii_offset_ + 2 * i] = static_cast<uint8_t>(h);
    rec[radii_offset_ + 2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
}

void PolarQuantizer::decode_one(const uint8_t* rec, float* x) const {
  decode_domain(rec, x);
  rot_.inverse(x, x);
}

void PolarQuantizer::decode_domain(const uint8_t* rec, float* x) const {
  const int d = dim();
  Scratch s(d);
  float* cur = s.y;
  float* nxt = s.r;
  const int n_radii = d >> levels_;
  for (int i = 0; i < n_radii; ++i)
    cur[i] = half_to_float(static_cast<uint16_t>(rec[radii_offset_ + 2 * i] |
                                                 rec[radii_offset_ + 2 * i + 1] << 8));
  for (int l = levels_; l >= 1; --l) {
    const int n = d >> l;
    const int bits = cb_[l - 1]->bits;
    k_.unpack(rec + level_offset_[l - 1], n, bits, s.codes);
    const float* cs = cos_[l - 1].data();
    const float* sn = sin_[l - 1].data();
    float* out = l == 1 ? x : nxt;
    for (int i = n - 1; i >= 0; --i) {  // out may be 2x longer than cur: fill from the end
      const float r = cur[i];
      out[2 * i] = r * cs[s.codes[i]];
      out[2 * i + 1] = r * sn[s.codes[i]];
    }
    std::swap(cur, nxt);
  }
}

}  // namespace tq::quant
