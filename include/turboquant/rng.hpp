// Deterministic random numbers. Everything random in turboquant (rotation
// signs, Haar matrices, QJL sketches, test data) comes from here, so a
// (seed, stream) pair reproduces it on every machine and compiler: no
// std::normal_distribution, whose output is implementation-defined.
//
//   tq::Rng rng(tq::derive_seed(seed, "qjl"));  double g = rng.gaussian();
#pragma once

#include <cstdint>
#include <string_view>

namespace tq {

// Mixes a base seed with a stream name, so independent components (the
// rotation and the QJL sketch) never share a stream.
uint64_t derive_seed(uint64_t seed, std::string_view stream);
uint64_t derive_seed(uint64_t seed, uint64_t stream);

class Rng {  // xoshiro256** seeded through splitmix64
 public:
  explicit Rng(uint64_t seed);
  uint64_t next_u64();
  double uniform();          // [0, 1), 53 random bits
  double gaussian();         // N(0, 1), Box-Muller with a cached spare
  uint64_t below(uint64_t n);  // uniform integer in [0, n)

 private:
  uint64_t s_[4];
  double spare_ = 0.0;
  bool has_spare_ = false;
};

}  // namespace tq
