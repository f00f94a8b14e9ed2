// Products of ggml-quantized weight rows with float activations: the kernels
// behind tq::matmul. Activations stay in float; each SIMD kernel decodes a
// weight block to floats in registers and multiply-adds it into several
// tokens at once (prefill reuses every decoded block for up to 4 tokens).
//
// qmatmul_ref.cpp is the specification: ggml::dequantize_row, then a dot per
// token. SIMD paths reorder sums and use FMA (also inside the block decode,
// q * d + m rounds once), so they agree with it within floating-point
// tolerance, |a - b| <= ~1e-5 * sum_c |W[r, c] x[t, c]|, not bit for bit.
//
//   const auto& k = tq::kernels::qmatmul_for(tq::simd_level());
//   if (auto fn = k.get(type)) fn(w, row_bytes, rows, cols, x, n, y, rows);
#pragma once

#include <cstddef>
#include <cstdint>

#include "turboquant/ggml_blocks.hpp"
#include "turboquant/simd.hpp"

namespace tq::kernels {

// y[t * ldy + r] = sum_c W[r, c] x[t * cols + c] for r < rows, t < n.
// w: rows rows of row_bytes bytes each (any alignment; row r at w + r * row_bytes),
// each `cols` elements of ggml blocks (cols a multiple of the block size);
// x: [n, cols]; y: [n, ldy]. Never allocates (safe on any thread).
using QMatmulFn = void (*)(const uint8_t* w, size_t row_bytes, int rows, int cols,
                           const float* x, int n, float* y, size_t ldy);

struct QMatmulKernels {
  SimdLevel level;
  // Per weight type; nullptr where this level has no fast path (then use the
  // reference table's entry). The float types (f32/f16/bf16) of the SIMD
  // levels need cols % 32 == 0 (see kQMatmulFloatCols).
  QMatmulFn f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q8_1, q4_k, q5_k, q6_k, q8_k;

  QMatmulFn get(ggml::Type t) const {
    switch (t) {
      case ggml::Type::f32: return f32;
      case ggml::Type::f16: return f16;
      case ggml::Type::bf16: return bf16;
      case ggml::Type::q4_0: return q4_0;
      case ggml::Type::q4_1: return q4_1;
      case ggml::Type::q5_0: return q5_0;
      case ggml::Type::q5_1: return q5_1;
      case ggml::Type::q8_0: return q8_0;
      case ggml::Type::q8_1: return q8_1;
      case ggml::Type::q4_k: return q4_k;
      case ggml::Type::q5_k: return q5_k;
      case ggml::Type::q6_k: return q6_k;
      case ggml::Type::q8_k: return q8_k;
      default: return nullptr;
    }
  }
};

// The SIMD kernels treat f32/f16/bf16 rows as 32-element blocks.
constexpr int kQMatmulFloatCols = 32;

// Every type dequantize_row supports (the generic path).
const QMatmulKernels& qmatmul_ref();
// nullptr when the build or the CPU lacks that level.
const QMatmulKernels* qmatmul_avx2();
const QMatmulKernels* qmatmul_avx512();
// The table for a level (throws tq::Error if unavailable).
const QMatmulKernels& qmatmul_for(SimdLevel level);
// The function that computes type t at `level` for rows of `cols` elements:
// the level's fast path when it has one for that shape, else the reference.
QMatmulFn qmatmul_pick(SimdLevel level, ggml::Type t, int cols);

}  // namespace tq::kernels
