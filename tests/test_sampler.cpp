// Sampling: greedy, determinism by seed, top-k / top-p support, frequencies.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "turboquant/error.hpp"
#include "turboquant/sampler.hpp"

namespace tq {
namespace {

TEST(Sampler, GreedyIsArgmaxLowestIdOnTies) {
  Sampler s({});
  const std::vector<float> l = {0.1f, 3.0f, -1.0f, 3.0f};
  EXPECT_EQ(s.sample(l.data(), 4), 1);
}

TEST(Sampler, TopKAndTopPRestrictTheSupport) {
  const std::vector<float> l = {5.0f, 4.0f, 3.0f, 0.0f, -1.0f};
  Sampler k({1.0f, 2, 1.0f, 7});
  Sampler p({1.0f, 0, 0.5f, 7});  // p(0) = 0.66 > 0.5: only token 0
  for (int i = 0; i < 500; ++i) {
    EXPECT_LT(k.sample(l.data(), 5), 2);
    EXPECT_EQ(p.sample(l.data(), 5), 0);
  }
}

TEST(Sampler, FrequenciesFollowTheSoftmaxAndSeedsReproduce) {
  const std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  Sampler a({1.0f, 0, 1.0f, 42}), b({1.0f, 0, 1.0f, 42});
  int count[3] = {};
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const int x = a.sample(l.data(), 3);
    EXPECT_EQ(x, b.sample(l.data(), 3));
    ++count[x];
  }
  const double want[3] = {0.5, 0.3, 0.2};
  for (int i = 0; i < 3; ++i) {
    const double se = std::sqrt(want[i] * (1 - want[i]) / n);
    EXPECT_NEAR(count[i] / double(n), want[i], 4 * se) << i;
  }
}

TEST(Sampler, BadParameters) {
  EXPECT_THROW(Sampler({-1.0f, 0, 1.0f, 0}), Error);
  EXPECT_THROW(Sampler({1.0f, -2, 1.0f, 0}), Error);
  EXPECT_THROW(Sampler({1.0f, 0, 0.0f, 0}), Error);
  EXPECT_THROW(Sampler({1.0f, 0, 1.5f, 0}), Error);
}

}  // namespace
}  // namespace tq
