// Attention-on-records kernels: score and accumulate straight from stored
// records (tq-mse codes, dense f32/f16/bf16), the g query heads of a GQA group
// sharing every record decoded.
//
// attn_kernels_ref.cpp is the scalar specification. Unlike kernels.hpp these
// need NOT be bit-identical across levels: SIMD paths reorder sums and use FMA,
// and agree with the reference within floating-point tolerance
// (|a - b| <= ~1e-5 * sum of |terms|).
//
// Record layouts (include/turboquant/format.hpp):
//  - tq-mse: [d b-bit codes, tight little-endian bitstream][scale at scale_off,
//    fp16 (scale_f32 = false) or f32], unaligned;
//  - dense kind 0 = f32 (d floats), 1 = f16 (d halves), 2 = bf16 (d bf16).
// Record j lives at recs + j * stride (any stride, any alignment).
#pragma once

#include <cstddef>
#include <cstdint>

#include "turboquant/simd.hpp"

namespace tq::kernels {

struct AttnKernels {
  SimdLevel level;

  // scores[h*n+j] = scale_j * sum_i q[h*d+i] * centroids[code_{j,i}]
  // q: [g, d], centroids: [2^bits], scores: [g, n]
  void (*score_codes)(const float* q, int g, int d, const uint8_t* recs, size_t stride, size_t n,
                      int bits, const float* centroids, size_t scale_off, bool scale_f32,
                      float* scores);
  // acc[h*d+i] += sum_j (w[h*n+j] * scale_j) * centroids[code_{j,i}]
  // w: [g, n], acc: [g, d]
  void (*accumulate_codes)(const float* w, int g, int d, const uint8_t* recs, size_t stride,
                           size_t n, int bits, const float* centroids, size_t scale_off,
                           bool scale_f32, float* acc);
  // Dense records (kind 0 = f32, 1 = f16, 2 = bf16):
  // scores[h*n+j] = <q_h, x_j>;  acc_h += sum_j w[h*n+j] x_j
  void (*score_dense)(int kind, const float* q, int g, int d, const uint8_t* recs, size_t stride,
                      size_t n, float* scores);
  void (*accumulate_dense)(int kind, const float* w, int g, int d, const uint8_t* recs,
                           size_t stride, size_t n, float* acc);
};

const AttnKernels& attn_kernels_ref();
// nullptr when the build or the CPU lacks that level.
const AttnKernels* attn_kernels_avx2();
const AttnKernels* attn_kernels_avx512();
// The table for a level (throws tq::Error if unavailable).
const AttnKernels& attn_kernels_for(SimdLevel level);

}  // namespace tq::kernels
