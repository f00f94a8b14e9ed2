#include "turboquant/sampler.hpp"

#include <algorithm>
#include <cmath>

#include "turboquant/error.hpp"

namespace tq {

Sampler::Sampler(const SamplerParams& p) : p_(p), rng_(p.seed) {
  TQ_REQUIRE(p.temperature >= 0 && std::isfinite(p.temperature), "temperature must be >= 0, got ",
             p.temperature);
  TQ_REQUIRE(p.top_k >= 0, "top_k must be >= 0, got ", p.top_k);
  TQ_REQUIRE(p.top_p > 0 && p.top_p <= 1, "top_p must be in (0, 1], got ", p.top_p);
}

int32_t Sampler::sample(const float* logits, int vocab) {
  TQ_REQUIRE(vocab > 0, "sample: empty vocabulary");
  if (p_.temperature == 0.0f) {
    int32_t best = 0;
    for (int i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  cand_.resize(vocab);
  for (int i = 0; i < vocab; ++i) cand_[i] = {logits[i] / p_.temperature, i};
  const int k = p_.top_k > 0 ? std::min(p_.top_k, vocab) : vocab;
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  std::partial_sort(cand_.begin(), cand_.begin() + k, cand_.end(), by_logit);
  cand_.resize(k);
  const float mx = cand_[0].first;
  double total = 0;
  for (auto& c : cand_) {
    c.first = std::exp(c.first - mx);
    total += c.first;
  }
  // Nucleus: the smallest prefix (by probability) whose mass reaches top_p.
  size_t keep = cand_.size();
  if (p_.top_p < 1.0f) {
    double acc = 0;
    for (size_t i = 0; i < cand_.size(); ++i) {
      acc += cand_[i].first / total;
      if (acc >= p_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) mass += cand_[i].first;
  double r = rng_.uniform() * mass;
  for (size_t i = 0; i < keep; ++i) {
    r -= cand_[i].first;
    if (r < 0) return cand_[i].second;
  }
  return cand_[keep - 1].second;
}

}  // namespace tq
