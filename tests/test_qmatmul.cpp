// tq::matmul (kernels/qmatmul.hpp) on every compiled SIMD level against an
// exact reference: ggml::dequantize_row, then a dot in double. SIMD kernels
// reorder sums and fuse multiply-adds (also inside the block decode), so each
// output must satisfy
//   |y - ref| <= 1e-5 * sum_c |W[r, c] x[t, c]| + tiny.
//
// Weights are random block bytes with finite random fp16 scales (every bit
// pattern of the quants is legal). Shapes: rows not a multiple of the task or
// tile size, cols from one block to 4096, n in {1, 2, 3, 5, 17}, threads 1
// and 2, weight data at odd addresses (rows of 18-byte Q4_0 blocks are
// misaligned anyway). Buffers are exactly sized, so AddressSanitizer catches
// overreads. Set TQ_TEST_SEED to vary the data.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/qmatmul.hpp"
#include "turboquant/error.hpp"
#include "turboquant/ggml_blocks.hpp"
#include "turboquant/half.hpp"
#include "turboquant/model.hpp"
#include "turboquant/rng.hpp"
#include "turboquant/simd.hpp"

namespace tq {
namespace {

using ggml::Type;

uint64_t test_seed() {
  const char* env = std::getenv("TQ_TEST_SEED");
  return env && *env ? std::strtoull(env, nullptr, 0) : 20250612ull;
}

constexpr double kRtol = 1e-5;

const std::vector<Type> kTypes = {Type::f32,  Type::f16,  Type::bf16, Type::q4_0, Type::q4_1,
                                  Type::q5_0, Type::q5_1, Type::q8_0, Type::q8_1, Type::q4_k,
                                  Type::q5_k, Type::q6_k, Type::q8_k};

void put_half(uint8_t* p, float f) {
  const uint16_t h = float_to_half(f);
  std::memcpy(p, &h, 2);
}

// Random bytes for `rows` rows of `cols` elements, with every scale field a
// finite fp16 (or f32) value of moderate size.
std::vector<uint8_t> random_weights(Type t, int rows, int cols, uint64_t seed) {
  const ggml::TypeTraits& tr = ggml::traits(t);
  const size_t rb = ggml::row_bytes(t, cols), nblocks = size_t(rows) * cols / tr.block_elems;
  std::vector<uint8_t> w(size_t(rows) * rb);
  Rng rng(seed);
  for (auto& b : w) b = uint8_t(rng.next_u64());
  auto scale = [&] { return float((rng.uniform() * 2 - 1) * 0.1); };
  for (size_t i = 0; i < nblocks; ++i) {
    uint8_t* p = w.data() + i * tr.block_bytes;
    switch (t) {
      case Type::f32: {
        const float f = float(rng.gaussian());
        std::memcpy(p, &f, 4);
        break;
      }
      case Type::f16: put_half(p, float(rng.gaussian())); break;
      case Type::bf16: {
        const uint16_t h = float_to_bf16(float(rng.gaussian()));
        std::memcpy(p, &h, 2);
        break;
      }
      case Type::q4_0: case Type::q5_0: case Type::q8_0: put_half(p, scale()); break;
      case Type::q4_1: case Type::q5_1: case Type::q8_1: case Type::q4_k: case Type::q5_k:
        put_half(p, scale());
        put_half(p + 2, scale());
        break;
      case Type::q6_k: put_half(p + 208, scale()); break;
      case Type::q8_k: {
        const float f = scale();
        std::memcpy(p, &f, 4);
        break;
      }
      default: ADD_FAILURE() << "no generator for " << ggml::to_string(t);
    }
  }
  return w;
}

struct Case {
  Type type;
  int rows, cols, n;
};

std::string describe(const Case& c, SimdLevel level, int threads, int offset, uint64_t seed) {
  return ggml::to_string(c.type) + " rows=" + std::to_string(c.rows) +
         " cols=" + std::to_string(c.cols) + " n=" + std::to_string(c.n) +
         " level=" + to_string(level) + " threads=" + std::to_string(threads) +
         " offset=" + std::to_string(offset) + " seed=" + std::to_string(seed);
}

// Runs one shape on every level, both thread counts and two weight offsets.
void check_case(const Case& c, uint64_t seed) {
  const std::vector<uint8_t> bytes = random_weights(c.type, c.rows, c.cols, seed);
  const size_t rb = ggml::row_bytes(c.type, c.cols);
  Rng rng(derive_seed(seed, "x"));
  std::vector<float> x(size_t(c.n) * c.cols);
  for (auto& v : x) v = float(rng.gaussian());

  // Exact reference and the tolerance per output.
  std::vector<double> ref(size_t(c.n) * c.rows), bound(ref.size());
  std::vector<float> row(c.cols);
  for (int r = 0; r < c.rows; ++r) {
    ggml::dequantize_row(c.type, bytes.data() + r * rb, c.cols, row.data());
    for (int t = 0; t < c.n; ++t) {
      double s = 0, a = 0;
      for (int j = 0; j < c.cols; ++j) {
        const double term = double(row[j]) * x[size_t(t) * c.cols + j];
        s += term;
        a += std::fabs(term);
      }
      ref[size_t(t) * c.rows + r] = s;
      bound[size_t(t) * c.rows + r] = kRtol * a + 1e-30;
    }
  }

  const SimdLevel saved = simd_level();
  for (SimdLevel level : available_simd_levels()) {
    set_simd_level(level);
    for (int threads : {1, 2}) {
      for (int offset : {0, 1}) {
        // Exactly sized copy at an odd address when offset = 1.
        std::vector<uint8_t> buf(bytes.size() + offset);
        std::memcpy(buf.data() + offset, bytes.data(), bytes.size());
        Weight w;
        w.type = c.type;
        w.rows = c.rows;
        w.cols = c.cols;
        w.data = buf.data() + offset;
        w.row_bytes = rb;
        std::vector<float> y(size_t(c.n) * c.rows, NAN);
        matmul(w, x.data(), c.n, y.data(), threads);
        int bad = 0;
        for (size_t i = 0; i < y.size() && bad < 3; ++i) {
          if (!(std::fabs(double(y[i]) - ref[i]) <= bound[i])) {
            ++bad;
            ADD_FAILURE() << describe(c, level, threads, offset, seed) << ": y[t=" << i / c.rows
                          << ", r=" << i % c.rows << "] = " << y[i] << ", ref " << ref[i]
                          << ", allowed error " << bound[i];
          }
        }
      }
    }
  }
  set_simd_level(saved);
}

std::vector<int> cols_for(Type t) {
  const int bs = ggml::traits(t).block_elems;
  if (bs == 256) return {256, 512, 1536, 4096};
  std::vector<int> c = {32, 64, 96, 576, 640, 4096};
  if (bs == 1) c.insert(c.end(), {1, 7, 33, 100});  // float rows off the 32-grid: generic path
  return c;
}

class QMatmul : public ::testing::TestWithParam<Type> {};

TEST_P(QMatmul, MatchesDequantizeAndDot) {
  const Type t = GetParam();
  const uint64_t seed = test_seed();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  uint64_t k = 0;
  for (int cols : cols_for(t)) {
    // Rows: 1, a tile tail, and counts that are not multiples of the task size.
    for (int rows : {1, 3, 37, 130}) {
      if (size_t(rows) * cols > 200000) continue;
      for (int n : {1, 2, 3, 5, 17}) {
        if (n == 17 && size_t(rows) * cols > 40000) continue;
        check_case({t, rows, cols, n}, derive_seed(seed, ++k));
      }
    }
  }
  // Large enough for several tasks per thread at every n.
  check_case({t, 301, 4096, 5}, derive_seed(seed, ++k));
}

INSTANTIATE_TEST_SUITE_P(AllTypes, QMatmul, ::testing::ValuesIn(kTypes),
                         [](const ::testing::TestParamInfo<Type>& info) {
                           return ggml::to_string(info.param);
                         });

// Every compiled SIMD table has a fast path for each type the target models use.
TEST(QMatmulTables, FastPathsPresent) {
  for (SimdLevel level : available_simd_levels()) {
    if (level == SimdLevel::scalar) continue;
    const kernels::QMatmulKernels& k = kernels::qmatmul_for(level);
    EXPECT_EQ(k.level, level);
    for (Type t : {Type::f32, Type::f16, Type::q4_0, Type::q4_1, Type::q5_0, Type::q8_0,
                   Type::q4_k, Type::q6_k})
      EXPECT_NE(k.get(t), nullptr) << to_string(level) << " " << ggml::to_string(t);
    // The selected kernel is the level's own, except f32 rows off the 32-grid.
    EXPECT_EQ(kernels::qmatmul_pick(level, Type::q4_1, 64), k.q4_1);
    EXPECT_EQ(kernels::qmatmul_pick(level, Type::f32, 33), kernels::qmatmul_ref().f32);
  }
}

TEST(QMatmulTables, UnsupportedTypeThrows) {
  std::vector<uint8_t> bytes(84, 0);
  Weight w;
  w.type = Type::q2_k;
  w.rows = 1;
  w.cols = 256;
  w.data = bytes.data();
  w.row_bytes = 84;
  std::vector<float> x(256, 1.0f), y(1);
  EXPECT_THROW(matmul(w, x.data(), 1, y.data(), 1), Error);
}

}  // namespace
}  // namespace tq
