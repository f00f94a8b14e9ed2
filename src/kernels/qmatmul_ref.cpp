// Reference quantized matmul: the specification the SIMD kernels are tested
// against, and the generic path for every type without a fast kernel.
// Each weight row is decoded (ggml::dequantize_row) in chunks of kChunk
// elements into a stack buffer and dotted with every token's activations.
#include <algorithm>

#include "kernels/qmatmul.hpp"
#include "turboquant/error.hpp"

namespace tq::kernels {
namespace {

// A multiple of every block size (1, 32, 256), so each chunk is whole blocks.
constexpr int kChunk = 1024;

// Eight partial sums keep the chain short (accuracy) and let the compiler
// overlap the adds; sum_j a_j b_j.
float dot_ref(const float* a, const float* b, int n) {
  float s[8] = {};
  int j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) s[l] += a[j + l] * b[j + l];
  for (; j < n; ++j) s[j & 7] += a[j] * b[j];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <ggml::Type T>
void qmatmul_generic(const uint8_t* w, size_t row_bytes, int rows, int cols, const float* x, int n,
                     float* y, size_t ldy) {
  const ggml::TypeTraits& tr = ggml::traits(T);
  TQ_ASSERT(cols % tr.block_elems == 0);
  float buf[kChunk];
  for (int r = 0; r < rows; ++r) {
    const uint8_t* row = w + size_t(r) * row_bytes;
    for (int t = 0; t < n; ++t) y[size_t(t) * ldy + r] = 0.0f;
    for (int c0 = 0; c0 < cols; c0 += kChunk) {
      const int len = std::min(kChunk, cols - c0);
      ggml::dequantize_row(T, row + size_t(c0 / tr.block_elems) * tr.block_bytes, len, buf);
      for (int t = 0; t < n; ++t)
        y[size_t(t) * ldy + r] += dot_ref(buf, x + size_t(t) * cols + c0, len);
    }
  }
}

using ggml::Type;

}  // namespace

const QMatmulKernels& qmatmul_ref() {
  static const QMatmulKernels k{SimdLevel::scalar,
                                qmatmul_generic<Type::f32>,  qmatmul_generic<Type::f16>,
                                qmatmul_generic<Type::bf16>, qmatmul_generic<Type::q4_0>,
                                qmatmul_generic<Type::q4_1>, qmatmul_generic<Type::q5_0>,
                                qmatmul_generic<Type::q5_1>, qmatmul_generic<Type::q8_0>,
                                qmatmul_generic<Type::q8_1>, qmatmul_generic<Type::q4_k>,
                                qmatmul_generic<Type::q5_k>, qmatmul_generic<Type::q6_k>,
                                qmatmul_generic<Type::q8_k>};
  return k;
}

#ifndef TQ_X86_SIMD
const QMatmulKernels* qmatmul_avx2() { return nullptr; }
const QMatmulKernels* qmatmul_avx512() { return nullptr; }
#endif

const QMatmulKernels& qmatmul_for(SimdLevel level) {
  switch (level) {
    case SimdLevel::scalar: return qmatmul_ref();
    case SimdLevel::avx2:
      if (auto* k = qmatmul_avx2()) return *k;
      break;
    case SimdLevel::avx512:
      if (auto* k = qmatmul_avx512()) return *k;
      break;
  }
  TQ_THROW("SIMD level ", to_string(level), " is not available on this CPU or build");
}

QMatmulFn qmatmul_pick(SimdLevel level, ggml::Type t, int cols) {
  const bool float_type = t == Type::f32 || t == Type::f16 || t == Type::bf16;
  if (level != SimdLevel::scalar && !(float_type && cols % kQMatmulFloatCols != 0))
    if (QMatmulFn fn = qmatmul_for(level).get(t)) return fn;
  QMatmulFn fn = qmatmul_ref().get(t);
  TQ_REQUIRE(fn && ggml::traits(t).supported, "matmul with ", ggml::to_string(t),
             " weights is not supported (yet)");
  return fn;
}

}  // namespace tq::kernels
