// Next-token sampling: greedy (temperature 0), or temperature with optional
// top-k and top-p (nucleus) filtering, reproducible from a seed.
//
//   tq::Sampler s({.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = 1});
//   int32_t next = s.sample(logits.data(), vocab);
#pragma once

#include <cstdint>
#include <vector>

#include "turboquant/rng.hpp"

namespace tq {

struct SamplerParams {
  float temperature = 0.0f;  // 0: greedy (argmax, lowest id on ties)
  int top_k = 0;             // 0: no limit
  float top_p = 1.0f;        // 1: no nucleus cut
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerParams& p);  // throws tq::Error on bad parameters
  int32_t sample(const float* logits, int vocab);

 private:
  SamplerParams p_;
  Rng rng_;
  std::vector<std::pair<float, int32_t>> cand_;
};

}  // namespace tq
