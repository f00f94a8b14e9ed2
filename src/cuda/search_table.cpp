// The append kernels' boundary tables (AppendSearch, mse_append.hpp): host
// code only, so that it builds (and its test runs) without CUDA too.
#include <algorithm>
#include <cmath>
#include <limits>

#include "cuda/mse_append.hpp"
#include "turboquant/error.hpp"

namespace tq::cuda {

namespace {
constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23, as mse_append_kernel.cuh
}  // namespace

SearchTable search_table(const std::vector<float>& boundaries, int bits) {
  TQ_ASSERT(bits >= 1 && int(boundaries.size()) == (1 << bits) - 1);
  // cell(b) is computed by the same float operations as the kernel's (an fma
  // of an exact product, then a clamp), and cell() is monotone in its
  // argument, so that a value and a boundary in different cells compare as
  // their cells do:
  //   code(v) = #{b : cell(b) < cell(v)} + #{b : cell(b) = cell(v), b < v}.
  // Widths of 6 bits and more have too many boundaries: binary search. (All
  // codebooks of 1-4 bits at dims 32 to 256, both laws, fit one per cell.)
  auto cell = [](float b, float scale) {
    const float t = std::fma(b, scale, kMagic);  // exact product, one rounding
    return std::clamp(static_cast<int>(t - kMagic), -16, 15);
  };
  SearchTable a{};
  a.search = AppendSearch::binary;
  const int k_max = bits <= 4 ? 1 : 2;
  for (int s = 16; s >= -8 && bits <= 5; --s) {
    const float scale = std::ldexp(1.0f, s);
    int count[32] = {};
    bool ok = true;
    for (float b : boundaries) ok &= ++count[cell(b, scale) + 16] <= k_max;
    if (!ok) continue;
    a.search = bits <= 4 ? AppendSearch::table1 : AppendSearch::table2;
    a.cell_scale = scale;
    for (int lane = 0; lane < 32; ++lane) {
      a.b0[lane] = a.b1[lane] = std::numeric_limits<float>::infinity();
      a.base[lane] = 0;
    }
    for (float b : boundaries) {
      const int lane = cell(b, scale) + 16;
      for (int l = lane + 1; l < 32; ++l) ++a.base[l];
      // -0 compares as +0; stored as +0 all the same.
      const float bb = b == 0.0f ? 0.0f : b;
      if (a.b0[lane] == std::numeric_limits<float>::infinity()) a.b0[lane] = bb;
      else a.b1[lane] = bb;  // boundaries ascend: b0 <= b1
    }
    break;
  }
  return a;
}

}  // namespace tq::cuda
