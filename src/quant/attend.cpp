// Default attention-on-records for every quantizer: decode each record into
// the quantizer's domain once, then use it for all g query heads. Formats
// with a faster path override these (quantizers.hpp).
#include <cstring>

#include "kernels/kernels.hpp"
#include "quant/scratch.hpp"
#include "turboquant/quantizer.hpp"

namespace tq {

void Quantizer::prepare_queries(const float* q, int g, float* qp) const {
  std::memcpy(qp, q, sizeof(float) * size_t(g) * dim_);
}

void Quantizer::score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
                      float* scores) const {
  const auto& k = kernels::kernels_for(simd_);
  const size_t qf = query_floats();
  quant::Scratch s(acc_floats());
  for (size_t j = 0; j < n; ++j) {
    decode_domain(recs + j * stride, s.y);
    for (int h = 0; h < g; ++h) scores[h * n + j] = k.dot(qp + h * qf, s.y, dim_);
  }
}

void Quantizer::accumulate(const float* w, int g, const uint8_t* recs, size_t stride, size_t n,
                           float* acc) const {
  const size_t af = acc_floats();
  quant::Scratch s(af);
  for (size_t j = 0; j < n; ++j) {
    decode_domain(recs + j * stride, s.y);
    for (int h = 0; h < g; ++h) {
      const float wj = w[h * n + j];
      if (wj == 0.0f) continue;
      float* a = acc + h * af;
      for (size_t i = 0; i < af; ++i) a[i] += wj * s.y[i];
    }
  }
}

void Quantizer::finish(const float* acc, int g, float* out) const {
  std::memcpy(out, acc, sizeof(float) * size_t(g) * dim_);
}

}  // namespace tq
