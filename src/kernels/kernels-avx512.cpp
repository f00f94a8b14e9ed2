// AVX-512 (F/BW/VL/DQ) kernels, bit-identical to kernels_ref.cpp.
//
// This file is compiled with -mavx512f/bw/vl/dq (+ the AVX2 set), so nothing
// here may execute before kernels_avx512() has checked the CPU: the table is
// constant-initialised data and the check itself is compiled for plain x86-64.
// Nor may it instantiate inline library code (std containers, strings): the
// linker could pick that COMDAT copy, compiled with these flags, for the whole
// program. Hence raw arrays and memcpy only.
// No _mm*_fmadd anywhere: a fused multiply-add rounds once where the
// reference rounds twice.
//
// How each primitive keeps the reference's exact rounding:
//  - sum_squares / dot: one zmm holds the 16 canonical lane sums (element i
//    goes to lane i % 16 in index order; the tail is a masked add, so unused
//    lanes are untouched), then the fixed 8/4/2/1 tree.
//  - fwht: the butterflies h = 1, 2, 4, 8 are lane permutes inside one zmm;
//    larger h pair whole registers. Every output is the same single a+b or
//    a-b as the reference (a-b possibly as a + (-b), which IEEE 754 defines
//    to be identical), so the order in which butterflies run is free.
//  - matvec: each output row keeps its own sequential sum over j; a zmm simply
//    holds 16 such rows (one mul, one add per term, no FMA).
//  - quantize: the reference's branch-free binary search, lane-parallel, with
//    the boundary of each step looked up by register permutes (no gathers:
//    they are slower than scalar loads on Zen 4).
//
// GCC 12's intrinsic headers trip its own -W(maybe-)uninitialized on the
// deliberately undefined vectors inside _mm512_undefined_ps() (GCC bug 105593,
// fixed in GCC 13); the warnings point into the headers, not at this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstring>

#include "kernels/kernels.hpp"
#include "kernels/cpu_features.hpp"

namespace tq::kernels {
namespace {

inline __mmask16 tail_mask16(int r) { return static_cast<__mmask16>((1u << r) - 1u); }

// ---- reductions --------------------------------------------------------------

// The reference tree: for w = 8, 4, 2, 1: lane[i] += lane[i + w].
inline float reduce_lanes(__m512 acc) {
  const __m256 a8 =
      _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  const __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
  const __m128 a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
  const __m128 a1 = _mm_add_ss(a2, _mm_movehdup_ps(a2));
  return _mm_cvtss_f32(a1);
}

float sum_squares_avx512(const float* x, int n) {
  __m512 acc = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
  }
  if (i < n) {
    const __mmask16 m = tail_mask16(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    acc = _mm512_mask_add_ps(acc, m, acc, _mm512_mul_ps(v, v));
  }
  return reduce_lanes(acc);
}

float dot_avx512(const float* a, const float* b, int n) {
  __m512 acc = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
  if (i < n) {
    const __mmask16 m = tail_mask16(n - i);
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i));
    acc = _mm512_mask_add_ps(acc, m, acc, p);
  }
  return reduce_lanes(acc);
}

// ---- elementwise -------------------------------------------------------------

void scale_avx512(float* x, int n, float s) {
  const __m512 vs = _mm512_set1_ps(s);
  int i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), vs));
  if (i < n) {
    const __mmask16 m = tail_mask16(n - i);
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vs));
  }
}

// A multiply, not a sign-bit xor: the two differ on NaN inputs.
void mul_signs_avx512(float* x, const float* signs, int n) {
  int i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(signs + i)));
  if (i < n) {
    const __mmask16 m = tail_mask16(n - i);
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, signs + i));
    _mm512_mask_storeu_ps(x + i, m, p);
  }
}

// ---- fast Walsh-Hadamard transform -------------------------------------------

void fwht_scalar(float* x, int n, float post_scale) {
  for (int h = 1; h < n; h *= 2)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  for (int i = 0; i < n; ++i) x[i] *= post_scale;
}

// One in-register stage: s holds each lane's partner (lane j ^ h). Lanes with
// bit h clear want a + b = s + v, lanes with it set want a - b = s - v; both
// are s + v * sign with sign = +1 / -1 per lane. The product is exact and
// x + (-y) is x - y bit for bit (IEEE 754 defines subtraction so), so this
// matches the reference while moving half the work from the two FP add pipes
// to the multiply pipes (the add pipes are the bottleneck here).
inline __m512 stage16(__m512 v, __m512 s, __mmask16 upper) {
  const __m512 sign = _mm512_mask_blend_ps(upper, _mm512_set1_ps(1.0f), _mm512_set1_ps(-1.0f));
  return _mm512_add_ps(s, _mm512_mul_ps(v, sign));
}

// Stages h = 1, 2, 4, 8 of a 16-float block.
inline __m512 fwht16(__m512 v) {
  v = stage16(v, _mm512_permute_ps(v, 0xB1), 0xAAAA);         // swap neighbours
  v = stage16(v, _mm512_permute_ps(v, 0x4E), 0xCCCC);         // swap pairs
  v = stage16(v, _mm512_shuffle_f32x4(v, v, 0xB1), 0xF0F0);   // swap 128-bit quarters
  v = stage16(v, _mm512_shuffle_f32x4(v, v, 0x4E), 0xFF00);   // swap 256-bit halves
  return v;
}

// n == 8 in one ymm (stages h = 1, 2, 4), then the post-scale.
void fwht8(float* x, float post_scale) {
  __m256 v = _mm256_loadu_ps(x);
  __m256 s = _mm256_permute_ps(v, 0xB1);
  v = _mm256_mask_sub_ps(_mm256_add_ps(v, s), 0xAA, s, v);
  s = _mm256_permute_ps(v, 0x4E);
  v = _mm256_mask_sub_ps(_mm256_add_ps(v, s), 0xCC, s, v);
  s = _mm256_permute2f128_ps(v, v, 0x01);
  v = _mm256_mask_sub_ps(_mm256_add_ps(v, s), 0xF0, s, v);
  _mm256_storeu_ps(x, _mm256_mul_ps(v, _mm256_set1_ps(post_scale)));
}

// All stages h < 16 * R of a block of R registers, held in registers; when the
// block is the whole vector the post-scale is applied on the way out.
template <int R>
void fwht_block(float* x, bool scale_out, __m512 post_scale) {
  __m512 r[R];
#pragma GCC unroll 16
  for (int k = 0; k < R; ++k) r[k] = fwht16(_mm512_loadu_ps(x + 16 * k));
#pragma GCC unroll 16
  for (int h = 1; h < R; h *= 2)
#pragma GCC unroll 16
    for (int k = 0; k < R; ++k)
      if (!(k & h)) {
        const __m512 a = r[k], b = r[k + h];
        r[k] = _mm512_add_ps(a, b);
        r[k + h] = _mm512_sub_ps(a, b);
      }
#pragma GCC unroll 16
  for (int k = 0; k < R; ++k)
    _mm512_storeu_ps(x + 16 * k, scale_out ? _mm512_mul_ps(r[k], post_scale) : r[k]);
}

void fwht_avx512(float* x, int n, float post_scale) {
  if (n < 8 || (n & (n - 1)) != 0) {  // tiny (or not a power of two): the reference loop
    fwht_scalar(x, n, post_scale);
    return;
  }
  if (n == 8) {
    fwht8(x, post_scale);
    return;
  }
  // Blocks of up to 256 floats (16 zmm) go through all their stages in
  // registers; stages h >= 256 then stream over memory, the last one scaling.
  constexpr int kBlock = 256;
  const int block = n < kBlock ? n : kBlock;
  const bool whole = block == n;
  const __m512 ps = _mm512_set1_ps(post_scale);
  for (int b = 0; b < n; b += block) {
    switch (block) {
      case 16: fwht_block<1>(x + b, whole, ps); break;
      case 32: fwht_block<2>(x + b, whole, ps); break;
      case 64: fwht_block<4>(x + b, whole, ps); break;
      case 128: fwht_block<8>(x + b, whole, ps); break;
      default: fwht_block<16>(x + b, whole, ps); break;
    }
  }
  for (int h = kBlock; h < n; h *= 2) {
    const bool last = 2 * h == n;
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; j += 16) {
        const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + h);
        __m512 s = _mm512_add_ps(a, b), d = _mm512_sub_ps(a, b);
        if (last) {
          s = _mm512_mul_ps(s, ps);
          d = _mm512_mul_ps(d, ps);
        }
        _mm512_storeu_ps(x + j, s);
        _mm512_storeu_ps(x + j + h, d);
      }
  }
}

// ---- matvec ------------------------------------------------------------------

// y[i0, i0 + 16R) of M x: R registers of 16 independent row sums, each
// accumulated over j in increasing order exactly like the reference.
template <int R>
void matvec_tile(const float* m_cols, const float* x, float* y, int rows, int cols, int i0) {
  __m512 acc[R];
#pragma GCC unroll 8
  for (int k = 0; k < R; ++k) acc[k] = _mm512_setzero_ps();
  const float* col = m_cols + i0;
  for (int j = 0; j < cols; ++j, col += rows) {
    const __m512 xj = _mm512_set1_ps(x[j]);
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k)
      acc[k] = _mm512_add_ps(acc[k], _mm512_mul_ps(_mm512_loadu_ps(col + 16 * k), xj));
  }
#pragma GCC unroll 8
  for (int k = 0; k < R; ++k) _mm512_storeu_ps(y + i0 + 16 * k, acc[k]);
}

void matvec_tail(const float* m_cols, const float* x, float* y, int rows, int cols, int i0) {
  const __mmask16 m = tail_mask16(rows - i0);
  __m512 acc = _mm512_setzero_ps();
  const float* col = m_cols + i0;
  for (int j = 0; j < cols; ++j, col += rows)
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, col), _mm512_set1_ps(x[j])));
  _mm512_mask_storeu_ps(y + i0, m, acc);
}

void matvec_avx512(const float* m_cols, const float* x, float* y, int rows, int cols) {
  int i = 0;
  for (; i + 128 <= rows; i += 128) matvec_tile<8>(m_cols, x, y, rows, cols, i);
  switch ((rows - i) / 16) {
    case 7: matvec_tile<7>(m_cols, x, y, rows, cols, i); break;
    case 6: matvec_tile<6>(m_cols, x, y, rows, cols, i); break;
    case 5: matvec_tile<5>(m_cols, x, y, rows, cols, i); break;
    case 4: matvec_tile<4>(m_cols, x, y, rows, cols, i); break;
    case 3: matvec_tile<3>(m_cols, x, y, rows, cols, i); break;
    case 2: matvec_tile<2>(m_cols, x, y, rows, cols, i); break;
    case 1: matvec_tile<1>(m_cols, x, y, rows, cols, i); break;
    default: break;
  }
  i += (rows - i) / 16 * 16;
  if (i < rows) matvec_tail(m_cols, x, y, rows, cols, i);
}

// ---- table lookups (quantize, dequantize) ------------------------------------

// A float table of 2^Bits entries held in max(1, 2^Bits / 16) zmm, looked up
// per lane. One register: permutexvar. More: permutex2var picks within each
// 32-entry pair of registers (index bits 0-4), then a blend tree on index bits
// 5, 6, 7. A gather would do the same, but on Zen 4 a zmm gather is slower
// than this, and even than scalar loads. Only the first `count` entries are
// read from memory (the rest are zero).
template <int Bits>
struct LookupTable {
  static constexpr int kRegs = Bits <= 4 ? 1 : (1 << Bits) / 16;
  LookupTable(const float* t, int count) {
#pragma GCC unroll 16
    for (int r = 0; r < kRegs; ++r) {
      const int left = count - 16 * r;
      reg[r] = left >= 16 ? _mm512_loadu_ps(t + 16 * r)
                          : _mm512_maskz_loadu_ps(tail_mask16(left > 0 ? left : 0), t + 16 * r);
    }
  }
  __m512 operator()(__m512i idx) const {
    if constexpr (kRegs == 1) {
      return _mm512_permutexvar_ps(idx, reg[0]);
    } else {
      __m512 r[kRegs / 2];
#pragma GCC unroll 8
      for (int j = 0; j < kRegs / 2; ++j) r[j] = _mm512_permutex2var_ps(reg[2 * j], idx, reg[2 * j + 1]);
      if constexpr (kRegs >= 4) fold<kRegs / 2>(r, idx, 5);
      if constexpr (kRegs >= 8) fold<kRegs / 4>(r, idx, 6);
      if constexpr (kRegs >= 16) fold<kRegs / 8>(r, idx, 7);
      return r[0];
    }
  }
  // r[0 .. Width) -> r[0 .. Width / 2): pairs chosen between by index bit `bit`.
  template <int Width>
  static void fold(__m512* r, __m512i idx, int bit) {
    const __mmask16 upper = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(1 << bit));
#pragma GCC unroll 4
    for (int j = 0; j < Width / 2; ++j) r[j] = _mm512_mask_blend_ps(upper, r[2 * j], r[2 * j + 1]);
  }
  __m512 reg[kRegs];
};

// ---- quantize ----------------------------------------------------------------

// Where each step of the search finds its boundary. The reference visits, at
// step s = 2^(bits-1), ..., 2, 1, boundaries[lo + s - 1] with lo a multiple
// of 2s.
//  - Up to 5 bits the whole table (<= 31 boundaries) sits in one or two zmm,
//    looked up by index lo + s - 1.
//  - From 6 bits, step s only reads boundaries[(2m + 1)s - 1] for
//    m = lo / 2s < 2^(bits-1) / s: the first five steps need at most 16 of
//    them each, kept in a per-step zmm indexed by lo >> log2(2s) (built once
//    per call from the whole table). The deeper steps look up lo + s - 1 in
//    the whole table (permute tree over 4-16 zmm).
// Every index stays below 2^bits - 1: no lane reads past the boundaries.
template <int Bits>
struct SearchTables {
  static constexpr int kTableSteps = Bits <= 5 ? 0 : 5;

  explicit SearchTables(const float* b) : whole_(b, (1 << Bits) - 1) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int t = 0; t < kTableSteps; ++t) {
      // Entry m (cyclic in m < 2^t): (2m + 1)s - 1 = (m << log2(2s)) + s - 1.
      const __m512i m = _mm512_and_si512(iota, _mm512_set1_epi32((1 << t) - 1));
      tab_[t] = whole_(_mm512_add_epi32(_mm512_slli_epi32(m, Bits - t),
                                        _mm512_set1_epi32((1 << (Bits - 1 - t)) - 1)));
    }
  }

  // boundaries[lo + s - 1] for step t (s = 2^(Bits-1-t)), per lane.
  __m512 bound(int t, __m512i lo) const {
    const int s = 1 << (Bits - 1 - t);
    if (t < kTableSteps) {
      if (t == 0) return tab_[0];  // every lane compares with boundaries[s - 1]
      return _mm512_permutexvar_ps(_mm512_srli_epi32(lo, Bits - t), tab_[t]);
    }
    return whole_(_mm512_add_epi32(lo, _mm512_set1_epi32(s - 1)));
  }

  LookupTable<Bits> whole_;
  __m512 tab_[kTableSteps > 0 ? kTableSteps : 1];
};

// The reference's search, 16 lanes at a time: lo += s where
// boundaries[lo + s - 1] < v (ordered compare: NaN never counts).
template <int Bits>
inline __m512i search(__m512 v, const SearchTables<Bits>& tables) {
  __m512i lo = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int t = 0; t < Bits; ++t) {
    const __mmask16 below = _mm512_cmp_ps_mask(tables.bound(t, lo), v, _CMP_LT_OQ);
    lo = _mm512_mask_add_epi32(lo, below, lo, _mm512_set1_epi32(1 << (Bits - 1 - t)));
  }
  return lo;
}

template <int Bits>
void quantize_bits(const float* x, int n, float mul, const float* boundaries, uint8_t* codes) {
  const SearchTables<Bits> tables(boundaries);
  const __m512 vm = _mm512_set1_ps(mul);
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i c = search<Bits>(_mm512_mul_ps(_mm512_loadu_ps(x + i), vm), tables);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
  }
  if (i < n) {
    const __mmask16 m = tail_mask16(n - i);
    const __m512i c = search<Bits>(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vm), tables);
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, m, c);
  }
}

void quantize_avx512(const float* x, int n, float mul, const float* boundaries, int bits,
                     uint8_t* codes) {
  switch (bits) {
    case 1: quantize_bits<1>(x, n, mul, boundaries, codes); return;
    case 2: quantize_bits<2>(x, n, mul, boundaries, codes); return;
    case 3: quantize_bits<3>(x, n, mul, boundaries, codes); return;
    case 4: quantize_bits<4>(x, n, mul, boundaries, codes); return;
    case 5: quantize_bits<5>(x, n, mul, boundaries, codes); return;
    case 6: quantize_bits<6>(x, n, mul, boundaries, codes); return;
    case 7: quantize_bits<7>(x, n, mul, boundaries, codes); return;
    case 8: quantize_bits<8>(x, n, mul, boundaries, codes); return;
    default: break;
  }
  kernels_ref().quantize(x, n, mul, boundaries, bits, codes);  // bits outside 1..8
}

// ---- dequantize --------------------------------------------------------------

template <int Bits>
void dequantize_bits(const uint8_t* codes, int n, const float* centroids, float* out) {
  const LookupTable<Bits> lookup(centroids, 1 << Bits);
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i idx =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    _mm512_storeu_ps(out + i, lookup(idx));
  }
  if (i < n) {
    const __mmask16 m = tail_mask16(n - i);
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, codes + i));
    _mm512_mask_storeu_ps(out + i, m, lookup(idx));  // masked-off lanes look up centroid 0
  }
}

void dequantize_avx512(const uint8_t* codes, int n, const float* centroids, int bits, float* out) {
  switch (bits) {
    case 1: dequantize_bits<1>(codes, n, centroids, out); return;
    case 2: dequantize_bits<2>(codes, n, centroids, out); return;
    case 3: dequantize_bits<3>(codes, n, centroids, out); return;
    case 4: dequantize_bits<4>(codes, n, centroids, out); return;
    case 5: dequantize_bits<5>(codes, n, centroids, out); return;
    case 6: dequantize_bits<6>(codes, n, centroids, out); return;
    case 7: dequantize_bits<7>(codes, n, centroids, out); return;
    case 8: dequantize_bits<8>(codes, n, centroids, out); return;
    default: kernels_ref().dequantize(codes, n, centroids, bits, out); return;
  }
}

// ---- pack / unpack -----------------------------------------------------------
//
// Eight codes of B bits fill exactly B bytes, so the stream splits into
// byte-aligned groups of 8 codes: BMI2 pext squeezes the low B bits of each of
// 8 code bytes into one word, pdep spreads them back. Widths 1, 2, 4 and 8
// have wider SIMD paths; the groups then finish the rest, and a last partial
// group goes through a zero-padded word (which also zero-pads the last byte).

template <int B>
constexpr uint64_t kLaneBits = 0x0101010101010101ull * ((1u << B) - 1u);

// Bytes [pos, size) of a buffer of `size` bytes (at most 8 of them) as a
// little-endian word, zero above. One 8-byte load of the buffer's last 8
// bytes where it has them: assembling the word through memory would stall on
// store forwarding.
inline uint64_t load_tail(const uint8_t* base, size_t size, size_t pos) {
  const size_t count = size - pos;
  if (count == 0) return 0;
  if (size >= 8) {
    uint64_t w;
    std::memcpy(&w, base + size - 8, 8);
    return w >> (8 * (8 - count));
  }
  uint64_t w = 0;
  for (size_t k = 0; k < count; ++k) w |= static_cast<uint64_t>(base[pos + k]) << (8 * k);
  return w;
}

// The low `count` (<= 8) bytes of v to p, little-endian.
inline void store_bytes(uint8_t* p, uint64_t v, size_t count) {
  for (size_t k = 0; k < count; ++k) p[k] = static_cast<uint8_t>(v >> (8 * k));
}

// Groups 0 .. k-1 of 8 codes whose 8-byte window [B g, B g + 8) lies inside
// the n_bytes stream (so one 8-byte load or store serves them).
template <int B>
size_t wide_group_count(size_t n_groups, size_t n_bytes) {
  if (n_bytes < 8) return 0;
  const size_t k = (n_bytes - 8) / B + 1;
  return k < n_groups ? k : n_groups;
}

// Codes [0, done) by SIMD; returns done (a multiple of 8).
template <int B>
size_t pack_simd(const uint8_t* codes, size_t n, uint8_t* out) {
  size_t i = 0;
  if constexpr (B == 1) {
    for (; i + 64 <= n; i += 64) {
      const __m512i v = _mm512_loadu_si512(codes + i);
      const uint64_t bits = _mm512_test_epi8_mask(v, _mm512_set1_epi8(1));
      std::memcpy(out + i / 8, &bits, 8);
    }
  } else if constexpr (B == 2) {
    for (; i + 64 <= n; i += 64) {
      const __m512i v = _mm512_loadu_si512(codes + i);
      const __m512i pairs = _mm512_maddubs_epi16(v, _mm512_set1_epi16(0x0401));    // c0 + 4 c1
      const __m512i quads = _mm512_madd_epi16(pairs, _mm512_set1_epi32(0x00100001));  // + 16 (c2 + 4 c3)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 4), _mm512_cvtepi32_epi8(quads));
    }
  } else if constexpr (B == 4) {
    for (; i + 64 <= n; i += 64) {
      const __m512i v = _mm512_loadu_si512(codes + i);
      const __m512i pairs = _mm512_maddubs_epi16(v, _mm512_set1_epi16(0x1001));  // c0 + 16 c1
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i / 2), _mm512_cvtepi16_epi8(pairs));
    }
  }
  return i;
}

template <int B>
size_t unpack_simd(const uint8_t* in, size_t n, uint8_t* codes) {
  size_t i = 0;
  if constexpr (B == 1) {
    for (; i + 64 <= n; i += 64) {
      uint64_t bits;
      std::memcpy(&bits, in + i / 8, 8);
      _mm512_storeu_si512(codes + i, _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(1)));
    }
  } else if constexpr (B == 2) {
    for (; i + 64 <= n; i += 64) {
      // One input byte per dword; move its 2-bit fields to the dword's 4 bytes.
      const __m512i d =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i / 4)));
      __m512i t = _mm512_or_si512(d, _mm512_slli_epi32(d, 6));
      t = _mm512_or_si512(t, _mm512_slli_epi32(d, 12));
      t = _mm512_or_si512(t, _mm512_slli_epi32(d, 18));
      _mm512_storeu_si512(codes + i, _mm512_and_si512(t, _mm512_set1_epi32(0x03030303)));
    }
  } else if constexpr (B == 4) {
    for (; i + 64 <= n; i += 64) {
      // One input byte per word; low nibble to the low byte, high to the high.
      const __m512i w =
          _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i / 2)));
      const __m512i t = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(0x000F)),
                                        _mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0F00)));
      _mm512_storeu_si512(codes + i, t);
    }
  }
  return i;
}

template <int B>
void pack_bits(const uint8_t* codes, size_t n, uint8_t* out) {
  if constexpr (B == 8) {
    std::memcpy(out, codes, n);
  } else {
    const size_t n_bytes = (n * B + 7) / 8;
    const size_t n_groups = n / 8;
    const size_t wide_groups = wide_group_count<B>(n_groups, n_bytes);
    size_t g = pack_simd<B>(codes, n, out) / 8;
    // The bytes of p past B are zero and the next group overwrites them, so a
    // full 8-byte store is fine wherever the buffer has room for it.
    for (; g < wide_groups; ++g) {
      uint64_t w;
      std::memcpy(&w, codes + 8 * g, 8);
      const uint64_t p = _pext_u64(w, kLaneBits<B>);
      std::memcpy(out + B * g, &p, 8);
    }
    for (; g < n_groups; ++g) {
      uint64_t w;
      std::memcpy(&w, codes + 8 * g, 8);
      const uint64_t p = _pext_u64(w, kLaneBits<B>);
      std::memcpy(out + B * g, &p, B);
    }
    if (8 * g < n) {  // zero codes pad the last group, so its last byte too
      const uint64_t p = _pext_u64(load_tail(codes, n, 8 * g), kLaneBits<B>);
      store_bytes(out + B * g, p, n_bytes - B * g);
    }
  }
}

template <int B>
void unpack_bits(const uint8_t* in, size_t n, uint8_t* codes) {
  if constexpr (B == 8) {
    std::memcpy(codes, in, n);
  } else {
    const size_t n_bytes = (n * B + 7) / 8;
    const size_t n_groups = n / 8;
    const size_t wide_groups = wide_group_count<B>(n_groups, n_bytes);
    size_t g = unpack_simd<B>(in, n, codes) / 8;
    for (; g < wide_groups; ++g) {  // pdep only consumes the low 8B bits
      uint64_t w;
      std::memcpy(&w, in + B * g, 8);
      const uint64_t c = _pdep_u64(w, kLaneBits<B>);
      std::memcpy(codes + 8 * g, &c, 8);
    }
    for (; g < n_groups; ++g) {
      const uint64_t c = _pdep_u64(load_tail(in, n_bytes, B * g), kLaneBits<B>);
      std::memcpy(codes + 8 * g, &c, 8);
    }
    if (8 * g < n) {  // padding bits land past code n - 1
      const uint64_t c = _pdep_u64(load_tail(in, n_bytes, B * g), kLaneBits<B>);
      store_bytes(codes + 8 * g, c, n - 8 * g);
    }
  }
}

void pack_avx512(const uint8_t* codes, size_t n, int bits, uint8_t* out) {
  switch (bits) {
    case 1: pack_bits<1>(codes, n, out); return;
    case 2: pack_bits<2>(codes, n, out); return;
    case 3: pack_bits<3>(codes, n, out); return;
    case 4: pack_bits<4>(codes, n, out); return;
    case 5: pack_bits<5>(codes, n, out); return;
    case 6: pack_bits<6>(codes, n, out); return;
    case 7: pack_bits<7>(codes, n, out); return;
    case 8: pack_bits<8>(codes, n, out); return;
    default: kernels_ref().pack(codes, n, bits, out); return;
  }
}

void unpack_avx512(const uint8_t* in, size_t n, int bits, uint8_t* codes) {
  switch (bits) {
    case 1: unpack_bits<1>(in, n, codes); return;
    case 2: unpack_bits<2>(in, n, codes); return;
    case 3: unpack_bits<3>(in, n, codes); return;
    case 4: unpack_bits<4>(in, n, codes); return;
    case 5: unpack_bits<5>(in, n, codes); return;
    case 6: unpack_bits<6>(in, n, codes); return;
    case 7: unpack_bits<7>(in, n, codes); return;
    case 8: unpack_bits<8>(in, n, codes); return;
    default: kernels_ref().unpack(in, n, bits, codes); return;
  }
}

// Constant-initialised: no code from this file runs before the CPU check.
constexpr Kernels kAvx512{SimdLevel::avx512, sum_squares_avx512, dot_avx512,
                          scale_avx512,      mul_signs_avx512,   fwht_avx512,
                          matvec_avx512,     quantize_avx512,    dequantize_avx512,
                          pack_avx512,       unpack_avx512};

}  // namespace

__attribute__((target("arch=x86-64"))) const Kernels* kernels_avx512() {
  static const bool ok = cpu_supports(SimdLevel::avx512);
  return ok ? &kAvx512 : nullptr;
}

}  // namespace tq::kernels
