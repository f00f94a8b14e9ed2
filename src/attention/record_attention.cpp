#include "turboquant/record_attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/attn_kernels.hpp"

namespace tq {
namespace {

// exp(x) for the softmax weights of masked / soft-capped chunks (x <= 0; the
// common fully visible chunk runs the SIMD softmax_chunk kernel instead):
// 2^(x log2 e) = 2^i * 2^f with f in (-1, 0] and a degree-8 Taylor series for
// 2^f (relative error < 2e-7). x below -87 (and -inf) gives ~0.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.4426950408889634f;
  const int i = static_cast<int>(t);  // truncates toward zero: f = t - i in (-1, 0]
  const float f = (t - static_cast<float>(i)) * 0.6931471805599453f;
  float p = 1.0f / 40320.0f;
  p = p * f + 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(i + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// GQA groups up to this size take the SIMD softmax path (corr on the stack).
constexpr int kMaxFastHeads = 64;

}  // namespace

OnlineSoftmax::OnlineSoftmax(int g, size_t acc_floats) : g_(g), af_(acc_floats) { reset(); }

void OnlineSoftmax::reset() {
  m.assign(g_, kEmptyLse);
  l.assign(g_, 0.0f);
  acc.assign(size_t(g_) * af_, 0.0f);
}

void OnlineSoftmax::finish(const Quantizer& vq, float* out, float* lse) {
  const int d = vq.dim();
  std::vector<float> norm(acc.size());
  for (int h = 0; h < g_; ++h) {
    const float inv = l[h] > 0 ? 1.0f / l[h] : 0.0f;
    for (size_t i = 0; i < af_; ++i) norm[h * af_ + i] = acc[h * af_ + i] * inv;
    lse[h] = l[h] > 0 ? m[h] + std::log(l[h]) : kEmptyLse;
  }
  vq.finish(norm.data(), g_, out);
  for (int h = 0; h < g_; ++h)
    if (!(l[h] > 0))
      for (int i = 0; i < d; ++i) out[size_t(h) * d + i] = 0.0f;
}

void attend_records(const Quantizer& kq, const Quantizer& vq, const float* qp, int g,
                    const uint8_t* krecs, size_t kstride, const uint8_t* vrecs, size_t vstride,
                    size_t n, int pos0, int q_pos, const AttentionParams& p, OnlineSoftmax& st) {
  if (n == 0) return;
  const float scale = p.scale > 0 ? p.scale : 1.0f / std::sqrt(static_cast<float>(kq.dim()));
  if (st.scores.size() < size_t(g) * n) st.scores.resize(size_t(g) * n);
  kq.score(qp, g, krecs, kstride, n, st.scores.data());
  const size_t af = vq.acc_floats();
  // The common case -- every key of the chunk visible, no softcap -- runs the
  // SIMD softmax kernel in place (scores become weights).
  const int last = pos0 + static_cast<int>(n) - 1;
  const bool all_visible =
      last <= q_pos && (p.window <= 0 || q_pos - pos0 < p.window || last < p.n_sinks);
  if (all_visible && p.softcap <= 0.0f) {
    float corr[kMaxFastHeads];
    if (g <= kMaxFastHeads) {
      kernels::attn_kernels_for(vq.simd())
          .softmax_chunk(st.scores.data(), g, n, scale, st.m.data(), st.l.data(), corr);
      for (int h = 0; h < g; ++h)
        if (corr[h] != 1.0f)
          for (size_t i = 0; i < af; ++i) st.acc[h * af + i] *= corr[h];
      vq.accumulate(st.scores.data(), g, vrecs, vstride, n, st.acc.data());
      return;
    }
  }
  if (st.weights.size() < size_t(g) * n) st.weights.resize(size_t(g) * n);
  bool any = false;
  for (int h = 0; h < g; ++h) {
    float* s = &st.scores[h * n];
    float mx = kEmptyLse;
    for (size_t j = 0; j < n; ++j) {
      if (!key_visible(q_pos, pos0 + static_cast<int>(j), p)) {
        s[j] = kEmptyLse;
        continue;
      }
      s[j] = apply_softcap(s[j] * scale, p.softcap);
      mx = std::max(mx, s[j]);
    }
    float* w = &st.weights[h * n];
    if (mx == kEmptyLse) {
      std::fill(w, w + n, 0.0f);
      continue;
    }
    any = true;
    const float m_new = std::max(st.m[h], mx);
    const float corr = std::exp(st.m[h] - m_new);  // 0 when m was -inf
    if (corr != 1.0f) {
      st.l[h] *= corr;
      for (size_t i = 0; i < af; ++i) st.acc[h * af + i] *= corr;
    }
    float sum = 0.0f;
    for (size_t j = 0; j < n; ++j)
      w[j] = s[j] == kEmptyLse ? 0.0f : exp_nonpositive(s[j] - m_new);
    for (size_t j = 0; j < n; ++j) sum += w[j];
    st.l[h] += sum;
    st.m[h] = m_new;
  }
  if (any) vq.accumulate(st.weights.data(), g, vrecs, vstride, n, st.acc.data());
}

}  // namespace tq
