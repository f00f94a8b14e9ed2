// The CPU kernel table: the few primitives every quantizer is built from.
//
// kernels_ref.cpp is the specification. Each SIMD file (kernels-avx2.cpp,
// kernels-avx512.cpp) must give bit-identical results, which constrains the
// reference in three ways:
//  - reductions (sum_squares, dot) use a canonical order: 16 lane partial
//    sums (element i goes to lane i % 16, accumulated in index order), then a
//    fixed tree: for w = 8, 4, 2, 1: lane[i] += lane[i + w];
//  - the fast Walsh-Hadamard transform does its butterflies stage by stage,
//    h = 1, 2, 4, ..., each output a single a+b or a-b;
//  - matvec accumulates y_i = sum_j M_ij x_j in increasing j, one mul and one
//    add per term (the library is built with -ffp-contract=off: no FMA).
// Integer outputs (codes, packed bytes) are exact by nature.
#pragma once

#include <cstddef>
#include <cstdint>

#include "turboquant/simd.hpp"

namespace tq::kernels {

struct Kernels {
  SimdLevel level;

  // sum_i x_i^2 and sum_i a_i b_i in the canonical order above. x: [n]
  float (*sum_squares)(const float* x, int n);
  float (*dot)(const float* a, const float* b, int n);

  // x_i *= s (s a float scalar). x: [n]
  void (*scale)(float* x, int n, float s);
  // x_i *= signs_i, signs are exactly +1.0f or -1.0f. x, signs: [n]
  void (*mul_signs)(float* x, const float* signs, int n);
  // In-place unnormalised Walsh-Hadamard transform, then x_i *= post_scale.
  // n is a power of two >= 1. x: [n]
  void (*fwht)(float* x, int n, float post_scale);
  // y = M x with M given column by column: m_cols[j * rows + i] = M_ij.
  // m_cols: [cols, rows], x: [cols], y: [rows]; y must not alias x.
  void (*matvec)(const float* m_cols, const float* x, float* y, int rows, int cols);

  // codes_i = #{ k : boundaries[k] < x_i * mul }, k < 2^bits - 1 (ascending).
  // x: [n], boundaries: [2^bits - 1], codes: [n]
  void (*quantize)(const float* x, int n, float mul, const float* boundaries, int bits,
                   uint8_t* codes);
  // out_i = centroids[codes_i]. codes: [n], centroids: [2^bits], out: [n]
  void (*dequantize)(const uint8_t* codes, int n, const float* centroids, int bits, float* out);

  // Tight little-endian bitstream: code i occupies stream bits [i*bits, (i+1)*bits),
  // stream bit k is bit (k % 8) of byte k / 8; the last byte is zero-padded.
  // codes: [n] (each < 2^bits), out: [ceil(n * bits / 8)]
  void (*pack)(const uint8_t* codes, size_t n, int bits, uint8_t* out);
  void (*unpack)(const uint8_t* in, size_t n, int bits, uint8_t* codes);
};

const Kernels& kernels_ref();
// nullptr when the build or the CPU lacks that level.
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();
// The table for a level (throws tq::Error if unavailable), and for the
// current tq::simd_level().
const Kernels& kernels_for(SimdLevel level);
const Kernels& kernels_active();

}  // namespace tq::kernels
