// Decode attention straight over encoded records, with an online softmax
// that can run over any number of chunks (pages) and be merged with other
// partial states (merge_states). This is what the KV cache runs per page; it
// is public so an engine with its own storage can use the same kernels.
//
//   tq::OnlineSoftmax st(g, vq.acc_floats());
//   kq.prepare_queries(q, g, qp.data());
//   for (each page) tq::attend_records(kq, vq, qp.data(), g, page..., st, params);
//   st.finish(vq, out, lse);   // out: [g, dim], lse: [g]
#pragma once

#include <cstdint>
#include <vector>

#include "turboquant/attention.hpp"
#include "turboquant/quantizer.hpp"

namespace tq {

class OnlineSoftmax {
 public:
  OnlineSoftmax(int g, size_t acc_floats);
  void reset();
  int heads() const { return g_; }
  // Maps the accumulated values back (vq.finish) and normalises.
  // out: [g, vq.dim()], lse: [g] (-inf and out = 0 for a head that saw no key)
  void finish(const Quantizer& vq, float* out, float* lse);

  std::vector<float> m, l;  // [g] running max and sum of exp
  std::vector<float> acc;   // [g, acc_floats]
  // scratch [g, chunk]; on fully visible chunks the scores turn into the
  // weights in place, weights is used by masked / soft-capped chunks only
  std::vector<float> scores, weights;
 private:
  int g_;
  size_t af_;
};

// One chunk of n keys/values at positions pos0 .. pos0+n-1 for g query heads
// at position q_pos (causal, window, sinks and softcap from params).
// qp: [g, kq.query_floats()] from kq.prepare_queries; krecs/vrecs: n records
// at strides kstride/vstride bytes.
void attend_records(const Quantizer& kq, const Quantizer& vq, const float* qp, int g,
                    const uint8_t* krecs, size_t kstride, const uint8_t* vrecs, size_t vstride,
                    size_t n, int pos0, int q_pos, const AttentionParams& params,
                    OnlineSoftmax& state);

}  // namespace tq
