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
//  - dense kind 0 = f32 (d floats), 1 = f16 (d halves), 2 = bf16 (d bf16);
//  - blocks: q8_0 [fp16 scale][32 x int8], q4_0 [fp16 scale][16 bytes: element
//    i in the low nibble of byte i, element i + 16 in the high nibble], value (q - 8) * scale.
// Record j lives at recs + j * stride (any stride, any alignment).
#pragma once

#include <cstddef>
#include <cstdint>

#include "turboquant/simd.hpp"

namespace tq::kernels {

// Where a PolarQuant record keeps its parts (quant/polar.cpp): the angle codes
// of level l (1..levels; dim >> l of them, bits[l - 1] bits each, a tight
// little-endian bitstream) at level_offset[l - 1], then dim >> levels fp16
// radii at radii_offset. Decoding walks the levels down: the n values of level
// l (its radii; level `levels` starts from the stored ones) become 2n values,
// out[2i] = r_i * cos[l - 1][code_i] and out[2i + 1] = r_i * sin[l - 1][code_i],
// each a single fp32 product; level 1's 2n = dim values are the vector in the
// rotated domain.
constexpr int kMaxPolarLevels = 12;
struct PolarLayout {
  int dim = 0, levels = 0;
  int bits[kMaxPolarLevels] = {};
  size_t level_offset[kMaxPolarLevels] = {};
  size_t radii_offset = 0;
  const float* cos[kMaxPolarLevels] = {};  // [2^bits[l]] per level
  const float* sin[kMaxPolarLevels] = {};
};

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
  // llama.cpp blocks (kind 0 = q8_0, 1 = q4_0; format.hpp BlockQ8_0 / BlockQ4_0,
  // d / 32 blocks per record, d a multiple of 32), values x_i = q_i * block scale:
  // scores[h*n+j] = <q_h, x_j>;  acc_h += sum_j w[h*n+j] x_j.
  // nullptr in a table that does not vectorise them (callers then decode).
  void (*score_blocks)(int kind, const float* q, int g, int d, const uint8_t* recs, size_t stride,
                       size_t n, float* scores);
  void (*accumulate_blocks)(int kind, const float* w, int g, int d, const uint8_t* recs,
                            size_t stride, size_t n, float* acc);
  // 1-bit sign sketches (tq-prod's QJL part): m sign bits at sign_off (bit i
  // of the tight bitstream; 1 = +1, 0 = -1), a per-record norm at norm_off
  // (fp16 or f32), each record weighted by factor * norm_j:
  // scores[h*n+j] = factor * norm_j * sum_i q[h*m+i] * sign_ji   (q: [g, m])
  // acc[h*m+i] += sum_j w[h*n+j] * factor * norm_j * sign_ji      (acc: [g, m])
  // nullptr in a table that does not vectorise them.
  void (*score_signs)(const float* q, int g, int m, const uint8_t* recs, size_t stride, size_t n,
                      size_t sign_off, float factor, size_t norm_off, bool norm_f32,
                      float* scores);
  void (*accumulate_signs)(const float* w, int g, int m, const uint8_t* recs, size_t stride,
                           size_t n, size_t sign_off, float factor, size_t norm_off,
                           bool norm_f32, float* acc);
  // One chunk of an online softmax with every key visible and no softcap.
  // s: [g, n] raw scores, overwritten by the weights exp(scale * s - m_new);
  // m, l: [g] running max and sum of exp, updated (m_new = max(m, scale * max_j s),
  // l = l * corr + sum_j w); corr: [g] receives exp(m_old - m_new) (0 when m_old = -inf),
  // the factor the caller applies to its accumulator. SIMD paths use a polynomial
  // exp (relative error < 1e-6) instead of libm's.
  void (*softmax_chunk)(float* s, int g, size_t n, float scale, float* m, float* l, float* corr);
  // PolarQuant records to rotated-domain vectors: out[j * dim + i]. Unlike the
  // kernels above this one IS bit-identical across levels (each output is one
  // product of the same two floats). out: [n, dim]
  void (*decode_polar)(const PolarLayout& L, const uint8_t* recs, size_t stride, size_t n, float* out);
};

const AttnKernels& attn_kernels_ref();
// nullptr when the build or the CPU lacks that level.
const AttnKernels* attn_kernels_avx2();
const AttnKernels* attn_kernels_avx512();
// The AVX-512 table without the VBMI code decoder (what a CPU without
// AVX512_VBMI runs), so tests can cover it on any AVX-512 machine.
const AttnKernels* attn_kernels_avx512_no_vbmi();
// The table for a level (throws tq::Error if unavailable).
const AttnKernels& attn_kernels_for(SimdLevel level);

}  // namespace tq::kernels
