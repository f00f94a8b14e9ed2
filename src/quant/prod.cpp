// TurboQuant-prod: a (b-1)-bit MSE stage plus a 1-bit QJL sketch of the
// residual r and its norm. <y, x_hat> = <y, x_mse> + c |r| <S y, sign(S r)>
// is unbiased when c matches the law of S's rows:
//   i.i.d. N(0,1) rows:        c = sqrt(pi/2) / m
//   unit rows uniform on S^{d-1} (orthonormal blocks of a Haar matrix):
//                              c = 1 / (m E|s_1|),  E|s_1| = G(d/2) / (sqrt(pi) G((d+1)/2))
// (~ sqrt(pi d / 2) / m). Everything happens in the rotated domain: S R has
// the same law as S, so the query side only needs R y once.
#include <cmath>
#include <cstring>
#include <numbers>
#include <vector>

#include "kernels/attn_kernels.hpp"
#include "quant/quantizers.hpp"
#include "quant/scratch.hpp"
#include "turboquant/error.hpp"
#include "turboquant/rng.hpp"

namespace tq::quant {

ProdQuantizer::ProdQuantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd)
    : Quantizer(spec, dim, seed, simd),
      k_(kernels::kernels_for(simd)),
      rot_(spec.rotation, dim, derive_seed(seed, "rotation"), simd),
      bits_(static_cast<int>(spec.bits)),
      m_(spec.sketch_rows ? spec.sketch_rows : dim) {
  if (bits_ > 1) stage_ = std::make_unique<MseStage>(spec, dim, bits_ - 1, k_);
  codes_bytes_ = bits_ > 1 ? packed_bytes(dim, bits_ - 1) : 0;
  sketch_bytes_ = packed_bytes(m_, 1);

  // S: [m, dim], row-major while we build it.
  std::vector<double> s(size_t(m_) * dim);
  const uint64_t sketch_seed = derive_seed(seed, "qjl");
  if (spec.sketch == SketchKind::gauss) {
    Rng rng(sketch_seed);
    for (auto& v : s) v = rng.gaussian();
    c_ = std::sqrt(std::numbers::pi / 2) / m_;
  } else {
    for (int row0 = 0, block = 0; row0 < m_; row0 += dim, ++block) {
      const std::vector<double> q = haar_orthogonal(dim, derive_seed(sketch_seed, block));
      const int rows = std::min(dim, m_ - row0);
      std::memcpy(&s[size_t(row0) * dim], q.data(), sizeof(double) * size_t(rows) * dim);
    }
    const double e_abs = std::exp(std::lgamma(dim / 2.0) - std::lgamma((dim + 1) / 2.0)) /
                         std::sqrt(std::numbers::pi);
    c_ = 1.0 / (m_ * e_abs);
  }
  s_cols_.resize(s.size());
  st_cols_.resize(s.size());
  for (int i = 0; i < m_; ++i)
    for (int j = 0; j < dim; ++j) {
      s_cols_[size_t(j) * m_ + i] = static_cast<float>(s[size_t(i) * dim + j]);
      st_cols_[size_t(i) * dim + j] = static_cast<float>(s[size_t(i) * dim + j]);
    }
}

void ProdQuantizer::encode_one(const float* x, uint8_t* rec) const {
  const int d = dim();
  const ScaleType st = spec().scale_type;
  const size_t sb = scale_bytes(st);
  Scratch s(std::max(d, m_));
  const float norm = checked_norm(k_, x, d);
  rot_.forward(x, s.y);
  // r = y - scale * c  (the residual in the rotated domain)
  float scale = 0.0f;
  if (stage_) {
    scale = stage_->code(s.y, norm, s.codes, s.c, true);
    // Round the scale to what is stored so the residual is the true one.
    uint8_t tmp[4];
    store_scale(tmp, scale, st);
    scale = load_scale(tmp, st);
    for (int i = 0; i < d; ++i) s.r[i] = s.y[i] - scale * s.c[i];
  } else {
    std::memcpy(s.r, s.y, sizeof(float) * d);
  }
  const float rnorm = std::sqrt(k_.sum_squares(s.r, d));
  k_.matvec(s_cols_.data(), s.r, s.z, m_, d);
  Scratch sig(m_);  // sign bits: 1 for S r >= 0
  for (int i = 0; i < m_; ++i) sig.codes[i] = s.z[i] >= 0.0f ? 1 : 0;
  uint8_t* p = rec;
  if (stage_) {
    store_scale(rec + codes_bytes_ + sketch_bytes_, scale, st);
    k_.pack(s.codes, d, bits_ - 1, p);
  }
  p += codes_bytes_;
  k_.pack(sig.codes, m_, 1, p);
  p += sketch_bytes_;
  if (stage_) p += sb;
  store_scale(p, rnorm, st);
}

void ProdQuantizer::decode_one(const uint8_t* rec, float* x) const {
  const int d = dim();
  const ScaleType st = spec().scale_type;
  const size_t sb = scale_bytes(st);
  Scratch s(std::max(d, m_));
  const uint8_t* p = rec;
  if (stage_) {
    k_.unpack(p, d, bits_ - 1, s.codes);
    k_.dequantize(s.codes, d, stage_->cb->centroids.data(), bits_ - 1, x);
    k_.scale(x, d, load_scale(rec + codes_bytes_ + sketch_bytes_, st));
  } else {
    std::memset(x, 0, sizeof(float) * d);
  }
  p += codes_bytes_;
  k_.unpack(p, m_, 1, s.codes);
  for (int i = 0; i < m_; ++i) s.z[i] = s.codes[i] ? 1.0f : -1.0f;
  p += sketch_bytes_;
  if (stage_) p += sb;
  const float rnorm = load_scale(p, st);
  k_.matvec(st_cols_.data(), s.z, s.r, d, m_);
  const float f = static_cast<float>(c_) * rnorm;
  for (int i = 0; i < d; ++i) x[i] += f * s.r[i];
  rot_.inverse(x, x);
}

}  // namespace tq::quant

namespace tq::quant {

// Attention on prod records. Score: s <Rq, c> + c_qjl |r| <S R q, sign>.
// Values: the MSE part accumulates in the rotated domain, the sketch part in
// the m-dimensional sketch domain; finish() applies S^T once per output.
void ProdQuantizer::prepare_queries(const float* q, int g, float* qp) const {
  const int d = dim();
  const size_t qf = query_floats();
  for (int h = 0; h < g; ++h) {
    float* out = qp + h * qf;
    rot_.forward(q + size_t(h) * d, out);
    k_.matvec(s_cols_.data(), out, out + d, m_, d);
  }
}

// One record's fields: the MSE centroids (unscaled) into c, the sign bits
// (0/1) into signs, and the two scalars.
ProdQuantizer::Fields ProdQuantizer::read_record(const uint8_t* rec, uint8_t* signs,
                                                 float* c) const {
  const ScaleType st = spec().scale_type;
  Fields f;
  if (stage_) {
    k_.unpack(rec, dim(), bits_ - 1, signs);
    k_.dequantize(signs, dim(), stage_->cb->centroids.data(), bits_ - 1, c);
    f.scale = load_scale(rec + codes_bytes_ + sketch_bytes_, st);
  }
  const float rnorm = load_scale(rec + codes_bytes_ + sketch_bytes_ + (stage_ ? scale_bytes(st) : 0), st);
  f.qjl_factor = static_cast<float>(c_) * rnorm;
  k_.unpack(rec + codes_bytes_, m_, 1, signs);  // after the MSE codes were consumed
  return f;
}

namespace {
// Per-thread regrouping buffers for the kernel path (grown once, then reused).
float* prod_buffer(int which, size_t n) {
  thread_local std::vector<float> b[3];
  if (b[which].size() < n) b[which].resize(n);
  return b[which].data();
}
}  // namespace

// With the attention kernels (attn_kernels.hpp): the MSE part is a tq-mse
// score on the codes (scale at its offset), the sketch part a sign-sketch
// score weighted by c * |r|; the query rows [Rq | SRq] are split into the two
// contiguous [g, d] and [g, m] blocks the kernels read.
void ProdQuantizer::score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
                          float* scores) const {
  const auto& ak = kernels::attn_kernels_for(simd());
  if (ak.score_signs) {
    const int d = dim();
    const size_t qf = query_floats(), sb = scale_bytes(spec().scale_type);
    const bool f32 = spec().scale_type == ScaleType::f32;
    float* qd = prod_buffer(0, size_t(g) * d);
    float* qs = prod_buffer(1, size_t(g) * m_);
    float* ss = prod_buffer(2, size_t(g) * n);
    for (int h = 0; h < g; ++h) {
      std::memcpy(qd + size_t(h) * d, qp + h * qf, sizeof(float) * d);
      std::memcpy(qs + size_t(h) * m_, qp + h * qf + d, sizeof(float) * m_);
    }
    const size_t scale_off = codes_bytes_ + sketch_bytes_;
    const size_t norm_off = scale_off + (stage_ ? sb : 0);
    ak.score_signs(qs, g, m_, recs, stride, n, codes_bytes_, static_cast<float>(c_), norm_off, f32,
                   ss);
    if (stage_) {
      ak.score_codes(qd, g, d, recs, stride, n, bits_ - 1, stage_->cb->centroids.data(), scale_off,
                     f32, scores);
      for (size_t i = 0; i < size_t(g) * n; ++i) scores[i] += ss[i];
    } else {
      std::memcpy(scores, ss, sizeof(float) * size_t(g) * n);
    }
    return;
  }
  const int d = dim();
  const size_t qf = query_floats();
  Scratch s(std::max(d, m_));
  for (size_t j = 0; j < n; ++j) {
    const Fields r = read_record(recs + j * stride, s.codes, s.c);
    for (int i = 0; i < m_; ++i) s.z[i] = s.codes[i] ? 1.0f : -1.0f;
    const float sc = r.scale, f = r.qjl_factor;
    for (int h = 0; h < g; ++h) {
      const float* q = qp + h * qf;
      const float mse = stage_ ? sc * k_.dot(q, s.c, d) : 0.0f;
      scores[h * n + j] = mse + f * k_.dot(q + d, s.z, m_);
    }
  }
}

void ProdQuantizer::accumulate(const float* w, int g, const uint8_t* recs, size_t stride,
                               size_t n, float* acc) const {
  const auto& ak = kernels::attn_kernels_for(simd());
  if (ak.accumulate_signs) {
    const int d = dim();
    const size_t af = acc_floats(), sb = scale_bytes(spec().scale_type);
    const bool f32 = spec().scale_type == ScaleType::f32;
    float* ad = prod_buffer(0, size_t(g) * d);
    float* as = prod_buffer(1, size_t(g) * m_);
    for (int h = 0; h < g; ++h) {
      std::memcpy(ad + size_t(h) * d, acc + h * af, sizeof(float) * d);
      std::memcpy(as + size_t(h) * m_, acc + h * af + d, sizeof(float) * m_);
    }
    const size_t scale_off = codes_bytes_ + sketch_bytes_;
    const size_t norm_off = scale_off + (stage_ ? sb : 0);
    if (stage_)
      ak.accumulate_codes(w, g, d, recs, stride, n, bits_ - 1, stage_->cb->centroids.data(),
                          scale_off, f32, ad);
    ak.accumulate_signs(w, g, m_, recs, stride, n, codes_bytes_, static_cast<float>(c_), norm_off,
                        f32, as);
    for (int h = 0; h < g; ++h) {
      std::memcpy(acc + h * af, ad + size_t(h) * d, sizeof(float) * d);
      std::memcpy(acc + h * af + d, as + size_t(h) * m_, sizeof(float) * m_);
    }
    return;
  }
  const int d = dim();
  const size_t af = acc_floats();
  Scratch s(std::max(d, m_));
  for (size_t j = 0; j < n; ++j) {
    const Fields r = read_record(recs + j * stride, s.codes, s.c);
    const float sc = r.scale, f = r.qjl_factor;
    for (int h = 0; h < g; ++h) {
      const float wj = w[h * n + j];
      if (wj == 0.0f) continue;
      float* a = acc + h * af;
      if (stage_)
        for (int i = 0; i < d; ++i) a[i] += (wj * sc) * s.c[i];
      const float fw = wj * f;
      for (int i = 0; i < m_; ++i) a[d + i] += s.codes[i] ? fw : -fw;
    }
  }
}

void ProdQuantizer::finish(const float* acc, int g, float* out) const {
  const int d = dim();
  const size_t af = acc_floats();
  Scratch s(std::max(d, m_));
  for (int h = 0; h < g; ++h) {
    const float* a = acc + h * af;
    k_.matvec(st_cols_.data(), a + d, s.r, d, m_);
    float* o = out + size_t(h) * d;
    for (int i = 0; i < d; ++i) o[i] = a[i] + s.r[i];
    rot_.inverse(o, o);
  }
}

}  // namespace tq::quant
