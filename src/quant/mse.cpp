// TurboQuant-MSE: norm, rotate, per-coordinate Lloyd-Max codes, one scale.
// Also the fractional-bit channel split built from two MSE quantizers.
#include <cmath>
#include <cstring>
#include <numeric>

#include "kernels/attn_kernels.hpp"
#include "quant/quantizers.hpp"
#include "quant/scratch.hpp"
#include "turboquant/error.hpp"
#include "turboquant/rng.hpp"

namespace tq::quant {

MseStage::MseStage(const FormatSpec& spec, int dim_, int bits_, const kernels::Kernels& k_)
    : dim(dim_), bits(bits_), scale_mode(spec.scale), cb(&sphere_codebook(spec.law, dim_, bits_)),
      k(&k_) {}

float MseStage::code(const float* y, float norm, uint8_t* codes, float* c,
                     bool want_centroids) const {
  if (norm == 0.0f) {  // zero vector: any codes, scale 0 decodes to exactly zero
    std::memset(codes, 0, dim);
    if (want_centroids) k->dequantize(codes, dim, cb->centroids.data(), bits, c);
    return 0.0f;
  }
  k->quantize(y, dim, 1.0f / norm, cb->boundaries.data(), bits, codes);
  if (!want_centroids && scale_mode == ScaleMode::norm) return norm;
  k->dequantize(codes, dim, cb->centroids.data(), bits, c);
  switch (scale_mode) {
    case ScaleMode::norm: return norm;
    case ScaleMode::ls: return k->dot(y, c, dim) / k->dot(c, c, dim);
    case ScaleMode::matched: return norm / std::sqrt(k->dot(c, c, dim));
  }
  return norm;
}

MseQuantizer::MseQuantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd)
    : Quantizer(spec, dim, seed, simd),
      k_(kernels::kernels_for(simd)),
      rot_(spec.rotation, dim, derive_seed(seed, "rotation"), simd),
      stage_(spec, dim, static_cast<int>(spec.bits), k_),
      codes_bytes_(packed_bytes(dim, static_cast<int>(spec.bits))) {}

void MseQuantizer::encode_one(const float* x, uint8_t* rec) const {
  const int d = dim();
  Scratch s(d);
  const float norm = checked_norm(k_, x, d);
  rot_.forward(x, s.y);
  const float scale = stage_.code(s.y, norm, s.codes, s.c, false);
  store_scale(rec + codes_bytes_, scale, spec().scale_type);  // throws before writing codes
  k_.pack(s.codes, d, stage_.bits, rec);
}

void MseQuantizer::decode_one(const uint8_t* rec, float* x) const {
  const int d = dim();
  Scratch s(d);
  k_.unpack(rec, d, stage_.bits, s.codes);
  k_.dequantize(s.codes, d, stage_.cb->centroids.data(), stage_.bits, x);
  rot_.inverse(x, x);
  k_.scale(x, d, load_scale(rec + codes_bytes_, spec().scale_type));
}

void MseQuantizer::decode_rotated(const uint8_t* rec, float* out) const {
  const int d = dim();
  Scratch s(d);
  k_.unpack(rec, d, stage_.bits, s.codes);
  k_.dequantize(s.codes, d, stage_.cb->centroids.data(), stage_.bits, out);
  k_.scale(out, d, load_scale(rec + codes_bytes_, spec().scale_type));
}

// Scores and values straight from the codes (attn_kernels.hpp): each record's
// codes are decoded to centroids once, in registers, and shared by the g query
// heads; the scale multiplies the dot product (score) or the weight (values),
// never the vector.
void MseQuantizer::score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
                         float* scores) const {
  kernels::attn_kernels_for(simd()).score_codes(
      qp, g, dim(), recs, stride, n, stage_.bits, stage_.cb->centroids.data(), codes_bytes_,
      spec().scale_type == ScaleType::f32, scores);
}

void MseQuantizer::accumulate(const float* w, int g, const uint8_t* recs, size_t stride, size_t n,
                              float* acc) const {
  kernels::attn_kernels_for(simd()).accumulate_codes(
      w, g, dim(), recs, stride, n, stage_.bits, stage_.cb->centroids.data(), codes_bytes_,
      spec().scale_type == ScaleType::f32, acc);
}

SplitQuantizer::SplitQuantizer(const FormatSpec& spec, int dim, const QuantizerOptions& opt,
                               SimdLevel simd)
    : Quantizer(spec, dim, opt.seed, simd) {
  const ChannelSplit sp = channel_split(spec, dim);
  if (opt.hi_channels.empty()) {
    hi_.resize(sp.hi_channels);
    std::iota(hi_.begin(), hi_.end(), 0);
  } else {
    TQ_REQUIRE(static_cast<int>(opt.hi_channels.size()) == sp.hi_channels, "format ",
               to_string(spec), " at dim ", dim, " codes ", sp.hi_channels,
               " channels at higher precision, but ", opt.hi_channels.size(), " were given");
    hi_ = opt.hi_channels;
  }
  std::vector<char> is_hi(dim, 0);
  for (int c : hi_) {
    TQ_REQUIRE(c >= 0 && c < dim, "hi channel ", c, " is outside 0..", dim - 1);
    TQ_REQUIRE(!is_hi[c], "hi channel ", c, " listed twice");
    is_hi[c] = 1;
  }
  for (int c = 0; c < dim; ++c)
    if (!is_hi[c]) lo_.push_back(c);
  FormatSpec hs = spec, ls = spec;
  hs.bits = sp.hi_bits;
  ls.bits = sp.lo_bits;
  hs.hi_channels = ls.hi_channels = 0;
  hs.hi_bits = ls.hi_bits = 0;
  qhi_ = std::make_unique<MseQuantizer>(hs, sp.hi_channels, derive_seed(opt.seed, "split-hi"), simd);
  qlo_ = std::make_unique<MseQuantizer>(ls, sp.lo_channels, derive_seed(opt.seed, "split-lo"), simd);
}

void SplitQuantizer::encode_one(const float* x, uint8_t* rec) const {
  Scratch s(dim());
  float* xh = s.y;
  float* xl = s.c;
  for (size_t i = 0; i < hi_.size(); ++i) xh[i] = x[hi_[i]];
  for (size_t i = 0; i < lo_.size(); ++i) xl[i] = x[lo_[i]];
  qhi_->encode_one(xh, rec);
  qlo_->encode_one(xl, rec + qhi_->bytes_per_vector());
}

void SplitQuantizer::decode_one(const uint8_t* rec, float* x) const {
  Scratch s(dim());
  float* xh = s.y;
  float* xl = s.c;
  qhi_->decode_one(rec, xh);
  qlo_->decode_one(rec + qhi_->bytes_per_vector(), xl);
  for (size_t i = 0; i < hi_.size(); ++i) x[hi_[i]] = xh[i];
  for (size_t i = 0; i < lo_.size(); ++i) x[lo_[i]] = xl[i];
}

void SplitQuantizer::prepare_queries(const float* q, int g, float* qp) const {
  const size_t nh = hi_.size(), nl = lo_.size();
  for (int h = 0; h < g; ++h) {
    const float* qh = q + size_t(h) * dim();
    float* out = qp + size_t(h) * dim();
    for (size_t i = 0; i < nh; ++i) out[i] = qh[hi_[i]];
    for (size_t i = 0; i < nl; ++i) out[nh + i] = qh[lo_[i]];
    qhi_->rotation().forward(out, out);
    qlo_->rotation().forward(out + nh, out + nh);
  }
}

void SplitQuantizer::decode_domain(const uint8_t* rec, float* out) const {
  qhi_->decode_rotated(rec, out);
  qlo_->decode_rotated(rec + qhi_->bytes_per_vector(), out + hi_.size());
}

// The query/accumulator rows are [hi | lo] per head; the halves' kernels want
// their own contiguous [g, n_sub] rows, so queries and accumulators are
// regrouped (g * dim floats, cheap next to scoring n records).
void SplitQuantizer::score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
                           float* scores) const {
  const size_t nh = hi_.size(), nl = lo_.size(), d = dim();
  std::vector<float> qh(g * nh), ql(g * nl), sl(g * n);
  for (int h = 0; h < g; ++h) {
    std::copy(qp + h * d, qp + h * d + nh, qh.begin() + h * nh);
    std::copy(qp + h * d + nh, qp + (h + 1) * d, ql.begin() + h * nl);
  }
  qhi_->score(qh.data(), g, recs, stride, n, scores);
  qlo_->score(ql.data(), g, recs + qhi_->bytes_per_vector(), stride, n, sl.data());
  for (size_t i = 0; i < g * n; ++i) scores[i] += sl[i];
}

void SplitQuantizer::accumulate(const float* w, int g, const uint8_t* recs, size_t stride,
                                size_t n, float* acc) const {
  const size_t nh = hi_.size(), nl = lo_.size(), d = dim();
  std::vector<float> ah(g * nh, 0.0f), al(g * nl, 0.0f);
  qhi_->accumulate(w, g, recs, stride, n, ah.data());
  qlo_->accumulate(w, g, recs + qhi_->bytes_per_vector(), stride, n, al.data());
  for (int h = 0; h < g; ++h) {
    for (size_t i = 0; i < nh; ++i) acc[h * d + i] += ah[h * nh + i];
    for (size_t i = 0; i < nl; ++i) acc[h * d + nh + i] += al[h * nl + i];
  }
}

void SplitQuantizer::finish(const float* acc, int g, float* out) const {
  const size_t nh = hi_.size(), nl = lo_.size();
  Scratch s(dim());
  for (int h = 0; h < g; ++h) {
    qhi_->rotation().inverse(acc + size_t(h) * dim(), s.y);
    qlo_->rotation().inverse(acc + size_t(h) * dim() + nh, s.y + nh);
    float* o = out + size_t(h) * dim();
    for (size_t i = 0; i < nh; ++i) o[hi_[i]] = s.y[i];
    for (size_t i = 0; i < nl; ++i) o[lo_[i]] = s.y[nh + i];
  }
}

}  // namespace tq::quant
