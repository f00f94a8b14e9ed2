#include <cmath>
#include <vector>

#include "turboquant/attention.hpp"

namespace tq {

void merge_states(const float* o_a, float lse_a, const float* o_b, float lse_b, float* o,
                  float* lse, int dim) {
  if (lse_a == kEmptyLse && lse_b == kEmptyLse) {
    for (int i = 0; i < dim; ++i) o[i] = 0.0f;
    *lse = kEmptyLse;
    return;
  }
  const float m = std::max(lse_a, lse_b);
  const float wa = std::exp(lse_a - m);  // exp(-inf) = 0: an empty part is neutral
  const float wb = std::exp(lse_b - m);
  const float inv = 1.0f / (wa + wb);
  for (int i = 0; i < dim; ++i) o[i] = (wa * o_a[i] + wb * o_b[i]) * inv;
  *lse = m + std::log(wa + wb);
}

float apply_softcap(float logit, float softcap) {
  return softcap > 0.0f ? softcap * std::tanh(logit / softcap) : logit;
}

bool key_visible(int q, int k, const AttentionParams& p) {
  if (k > q) return false;
  if (k < p.n_sinks) return true;
  return p.window <= 0 || q - k < p.window;
}

double attention_ref(const float* q, const float* k, const float* v, size_t n_keys, size_t stride,
                     int dim, int q_pos, const AttentionParams& p, float* out) {
  const double scale = p.scale > 0 ? p.scale : 1.0 / std::sqrt(double(dim));
  std::vector<double> logits(n_keys, -INFINITY);
  double m = -INFINITY;
  for (size_t j = 0; j < n_keys; ++j) {
    if (!key_visible(q_pos, static_cast<int>(j), p)) continue;
    double s = 0;
    for (int i = 0; i < dim; ++i) s += double(q[i]) * k[j * stride + i];
    s *= scale;
    if (p.softcap > 0) s = p.softcap * std::tanh(s / p.softcap);
    logits[j] = s;
    m = std::max(m, s);
  }
  std::vector<double> acc(dim, 0.0);
  if (m == -INFINITY) {
    for (int i = 0; i < dim; ++i) out[i] = 0.0f;
    return -INFINITY;
  }
  double l = 0;
  for (size_t j = 0; j < n_keys; ++j) {
    if (logits[j] == -INFINITY) continue;
    const double w = std::exp(logits[j] - m);
    l += w;
    for (int i = 0; i < dim; ++i) acc[i] += w * v[j * stride + i];
  }
  for (int i = 0; i < dim; ++i) out[i] = static_cast<float>(acc[i] / l);
  return m + std::log(l);
}

}  // namespace tq
