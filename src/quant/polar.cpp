// PolarQuant: rotate, then a recursive polar transform. Level 1 turns each
// coordinate pair into (radius, angle in [0, 2pi)); level l pairs the radii
// of level l-1 into (radius, angle in [0, pi/2]). After L levels only
// dim/2^L radii remain (stored fp16); every angle is coded with a Lloyd-Max
// codebook for its level's exact law (codebook.hpp), bit-packed.
// Encoding's angle arithmetic is scalar (libm atan2/cos/sin); the rotation and
// the code search use the SIMD kernels. Decoding (and attention on records)
// goes through the decode_polar kernel (attn_kernels.hpp).
#include <algorithm>
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
  TQ_REQUIRE(levels_ >= 1 && levels_ <= kernels::kMaxPolarLevels, "polar: 1 to ",
             kernels::kMaxPolarLevels, " levels, got ", levels_);
  layout_.dim = dim;
  layout_.levels = levels_;
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
    layout_.bits[l - 1] = bits;
    layout_.level_offset[l - 1] = off;
    layout_.cos[l - 1] = cos_.back().data();
    layout_.sin[l - 1] = sin_.back().data();
    off += packed_bytes(dim >> l, bits);
  }
  layout_.radii_offset = off;
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
    k_.pack(s.codes, n, bits, rec + layout_.level_offset[l - 1]);
    std::swap(cur, nxt);
  }
  const int n_radii = d >> levels_;
  for (int i = 0; i < n_radii; ++i) {
    TQ_REQUIRE(cur[i] <= kHalfMax, "polar radius ", cur[i], " does not fit fp16 (max 65504)");
    const uint16_t h = float_to_half(cur[i]);
    rec[layout_.radii_offset + 2 * i] = static_cast<uint8_t>(h);
    rec[layout_.radii_offset + 2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
}

void PolarQuantizer::decode_one(const uint8_t* rec, float* x) const {
  decode_domain(rec, x);
  rot_.inverse(x, x);
}

void PolarQuantizer::decode_domain(const uint8_t* rec, float* x) const { decode_block(rec, 0, 1, x); }

// The SIMD table's decoder where it has one (bit-identical to the reference).
void PolarQuantizer::decode_block(const uint8_t* recs, size_t stride, size_t n, float* out) const {
  const auto f = kernels::attn_kernels_for(simd()).decode_polar;
  (f != nullptr ? f : kernels::attn_kernels_ref().decode_polar)(layout_, recs, stride, n, out);
}

// kPolarBlock records at a time, decoded into scratch (16 KB at d 128: stays
// in L1); fn(j0, m, rows, tmp) then runs the dense f32 kernels on the m rows
// [m, dim]; tmp has room for [g, m] floats.
constexpr size_t kPolarBlock = 32;

template <class F>
void PolarQuantizer::each_block(int g, const uint8_t* recs, size_t stride, size_t n, F&& fn) const {
  Scratch s(kPolarBlock * size_t(std::max(dim(), g)));
  for (size_t j0 = 0; j0 < n; j0 += kPolarBlock) {
    const size_t m = std::min(kPolarBlock, n - j0);
    decode_block(recs + j0 * stride, stride, m, s.y);
    fn(j0, m, reinterpret_cast<const uint8_t*>(s.y), s.c);
  }
}

void PolarQuantizer::score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
                           float* scores) const {
  const auto& ak = kernels::attn_kernels_for(simd());
  const int d = dim();
  each_block(g, recs, stride, n, [&](size_t j0, size_t m, const uint8_t* rows, float* tmp) {
    ak.score_dense(0, qp, g, d, rows, sizeof(float) * d, m, tmp);  // tmp: [g, m]
    for (int h = 0; h < g; ++h) std::copy(tmp + size_t(h) * m, tmp + size_t(h + 1) * m, scores + size_t(h) * n + j0);
  });
}

void PolarQuantizer::accumulate(const float* w, int g, const uint8_t* recs, size_t stride, size_t n,
                                float* acc) const {
  const auto& ak = kernels::attn_kernels_for(simd());
  const int d = dim();
  each_block(g, recs, stride, n, [&](size_t j0, size_t m, const uint8_t* rows, float* tmp) {
    for (int h = 0; h < g; ++h)  // this block's weights: [g, m]
      std::copy(w + size_t(h) * n + j0, w + size_t(h) * n + j0 + m, tmp + size_t(h) * m);
    ak.accumulate_dense(0, tmp, g, d, rows, sizeof(float) * d, m, acc);
  });
}

}  // namespace tq::quant
