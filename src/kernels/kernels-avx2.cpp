// AVX2 (+FMA, F16C, BMI2 present, FMA unused) kernels, bit-identical to
// kernels_ref.cpp.
//
// This file is compiled with -mavx2 -mfma -mf16c -mbmi2, so nothing here may
// execute before kernels_avx2() has checked the CPU: the table is
// constant-initialised data and the check itself is compiled for plain x86-64.
// Nor may it instantiate inline library code (std containers, strings): the
// linker could pick that COMDAT copy, compiled with these flags, for the whole
// program. Hence raw arrays and memcpy only.
// No _mm*_fmadd anywhere: a fused multiply-add rounds once where the
// reference rounds twice.
//
// How each primitive keeps the reference's exact rounding:
//  - sum_squares / dot: two ymm accumulators are the 16 canonical lane sums
//    (lanes 0-7 and 8-15; element i goes to lane i % 16 in index order, the
//    tail is blended in so unused lanes are untouched), then the fixed
//    8/4/2/1 tree.
//  - fwht: the butterflies h = 1, 2, 4 are lane permutes inside one ymm;
//    larger h pair whole registers. Every output is the same single a+b or
//    a-b as the reference (a-b possibly as a + (-b), which IEEE 754 defines
//    to be identical), so the order in which butterflies run is free.
//  - matvec: each output row keeps its own sequential sum over j; a ymm simply
//    holds 8 such rows (one mul, one add per term).
//  - quantize: the reference's branch-free binary search, lane-parallel, with
//    the boundary of each step looked up by permutes of a per-step table
//    (all steps at <= 5 bits, the first five above) or by a gather.
#include <immintrin.h>

#include <cstring>

#include "kernels/kernels.hpp"
#include "kernels/cpu_features.hpp"

namespace tq::kernels {
namespace {

// All-ones in lanes [0, r) of 8 (r may be <= 0 or >= 8).
inline __m256i lanes_below(int r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// ---- reductions --------------------------------------------------------------

// The reference tree over lanes lo = 0..7, hi = 8..15:
// for w = 8, 4, 2, 1: lane[i] += lane[i + w].
inline float reduce_lanes(__m256 lo, __m256 hi) {
  const __m256 a8 = _mm256_add_ps(lo, hi);
  const __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
  const __m128 a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
  const __m128 a1 = _mm_add_ss(a2, _mm_movehdup_ps(a2));
  return _mm_cvtss_f32(a1);
}

// acc += p only in the lanes of m (maskload zeroes the others; blending, not
// adding +0, keeps those lanes' bits untouched).
inline __m256 masked_acc(__m256 acc, __m256 p, __m256i m) {
  return _mm256_blendv_ps(acc, _mm256_add_ps(acc, p), _mm256_castsi256_ps(m));
}

float sum_squares_avx2(const float* x, int n) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    lo = _mm256_add_ps(lo, _mm256_mul_ps(a, a));
    hi = _mm256_add_ps(hi, _mm256_mul_ps(b, b));
  }
  if (i < n) {
    const __m256i m0 = lanes_below(n - i), m1 = lanes_below(n - i - 8);
    const __m256 a = _mm256_maskload_ps(x + i, m0), b = _mm256_maskload_ps(x + i + 8, m1);
    lo = masked_acc(lo, _mm256_mul_ps(a, a), m0);
    hi = masked_acc(hi, _mm256_mul_ps(b, b), m1);
  }
  return reduce_lanes(lo, hi);
}

float dot_avx2(const float* a, const float* b, int n) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8)));
  }
  if (i < n) {
    const __m256i m0 = lanes_below(n - i), m1 = lanes_below(n - i - 8);
    const __m256 p0 = _mm256_mul_ps(_mm256_maskload_ps(a + i, m0), _mm256_maskload_ps(b + i, m0));
    const __m256 p1 =
        _mm256_mul_ps(_mm256_maskload_ps(a + i + 8, m1), _mm256_maskload_ps(b + i + 8, m1));
    lo = masked_acc(lo, p0, m0);
    hi = masked_acc(hi, p1, m1);
  }
  return reduce_lanes(lo, hi);
}

// ---- elementwise -------------------------------------------------------------

void scale_avx2(float* x, int n, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vs));
  for (; i < n; ++i) x[i] *= s;
}

// A multiply, not a sign-bit xor: the two differ on NaN inputs.
void mul_signs_avx2(float* x, const float* signs, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(signs + i)));
  for (; i < n; ++i) x[i] *= signs[i];
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
// bit h clear (kUpper clear) want a + b = s + v, lanes with it set want
// a - b = s - v; both are s + v * sign with sign = +1 / -1 per lane. The
// product is exact and x + (-y) is x - y bit for bit (IEEE 754 defines
// subtraction so), so this matches the reference while moving half the work
// from the FP add pipes to the multiply pipes.
template <int kUpper>
inline __m256 stage8(__m256 v, __m256 s) {
  const __m256 sign = _mm256_blend_ps(_mm256_set1_ps(1.0f), _mm256_set1_ps(-1.0f), kUpper);
  return _mm256_add_ps(s, _mm256_mul_ps(v, sign));
}

// Stages h = 1, 2, 4 of an 8-float block.
inline __m256 fwht8(__m256 v) {
  v = stage8<0xAA>(v, _mm256_permute_ps(v, 0xB1));           // swap neighbours
  v = stage8<0xCC>(v, _mm256_permute_ps(v, 0x4E));           // swap pairs
  v = stage8<0xF0>(v, _mm256_permute2f128_ps(v, v, 0x01));   // swap 128-bit halves
  return v;
}

// All stages h < 8 * R of a block of R registers, held in registers; when the
// block is the whole vector the post-scale is applied on the way out.
template <int R>
void fwht_block(float* x, bool scale_out, __m256 post_scale) {
  __m256 r[R];
#pragma GCC unroll 16
  for (int k = 0; k < R; ++k) r[k] = fwht8(_mm256_loadu_ps(x + 8 * k));
#pragma GCC unroll 16
  for (int h = 1; h < R; h *= 2)
#pragma GCC unroll 16
    for (int k = 0; k < R; ++k)
      if (!(k & h)) {
        const __m256 a = r[k], b = r[k + h];
        r[k] = _mm256_add_ps(a, b);
        r[k + h] = _mm256_sub_ps(a, b);
      }
#pragma GCC unroll 16
  for (int k = 0; k < R; ++k)
    _mm256_storeu_ps(x + 8 * k, scale_out ? _mm256_mul_ps(r[k], post_scale) : r[k]);
}

void fwht_avx2(float* x, int n, float post_scale) {
  if (n < 8 || (n & (n - 1)) != 0) {  // tiny (or not a power of two): the reference loop
    fwht_scalar(x, n, post_scale);
    return;
  }
  // Blocks of up to 128 floats (16 ymm) go through all their stages in
  // registers; stages h >= 128 then stream over memory, the last one scaling.
  constexpr int kBlock = 128;
  const int block = n < kBlock ? n : kBlock;
  const bool whole = block == n;
  const __m256 ps = _mm256_set1_ps(post_scale);
  for (int b = 0; b < n; b += block) {
    switch (block) {
      case 8: fwht_block<1>(x + b, whole, ps); break;
      case 16: fwht_block<2>(x + b, whole, ps); break;
      case 32: fwht_block<4>(x + b, whole, ps); break;
      case 64: fwht_block<8>(x + b, whole, ps); break;
      default: fwht_block<16>(x + b, whole, ps); break;
    }
  }
  for (int h = kBlock; h < n; h *= 2) {
    const bool last = 2 * h == n;
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
        __m256 s = _mm256_add_ps(a, b), d = _mm256_sub_ps(a, b);
        if (last) {
          s = _mm256_mul_ps(s, ps);
          d = _mm256_mul_ps(d, ps);
        }
        _mm256_storeu_ps(x + j, s);
        _mm256_storeu_ps(x + j + h, d);
      }
  }
}

// ---- matvec ------------------------------------------------------------------

// y[i0, i0 + 8R) of M x: R registers of 8 independent row sums, each
// accumulated over j in increasing order exactly like the reference.
template <int R>
void matvec_tile(const float* m_cols, const float* x, float* y, int rows, int cols, int i0) {
  __m256 acc[R];
#pragma GCC unroll 8
  for (int k = 0; k < R; ++k) acc[k] = _mm256_setzero_ps();
  const float* col = m_cols + i0;
  for (int j = 0; j < cols; ++j, col += rows) {
    const __m256 xj = _mm256_set1_ps(x[j]);
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k)
      acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(_mm256_loadu_ps(col + 8 * k), xj));
  }
#pragma GCC unroll 8
  for (int k = 0; k < R; ++k) _mm256_storeu_ps(y + i0 + 8 * k, acc[k]);
}

void matvec_tail(const float* m_cols, const float* x, float* y, int rows, int cols, int i0) {
  const __m256i m = lanes_below(rows - i0);
  __m256 acc = _mm256_setzero_ps();
  const float* col = m_cols + i0;
  for (int j = 0; j < cols; ++j, col += rows)
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_maskload_ps(col, m), _mm256_set1_ps(x[j])));
  _mm256_maskstore_ps(y + i0, m, acc);
}

void matvec_avx2(const float* m_cols, const float* x, float* y, int rows, int cols) {
  int i = 0;
  for (; i + 64 <= rows; i += 64) matvec_tile<8>(m_cols, x, y, rows, cols, i);
  switch ((rows - i) / 8) {
    case 7: matvec_tile<7>(m_cols, x, y, rows, cols, i); break;
    case 6: matvec_tile<6>(m_cols, x, y, rows, cols, i); break;
    case 5: matvec_tile<5>(m_cols, x, y, rows, cols, i); break;
    case 4: matvec_tile<4>(m_cols, x, y, rows, cols, i); break;
    case 3: matvec_tile<3>(m_cols, x, y, rows, cols, i); break;
    case 2: matvec_tile<2>(m_cols, x, y, rows, cols, i); break;
    case 1: matvec_tile<1>(m_cols, x, y, rows, cols, i); break;
    default: break;
  }
  i += (rows - i) / 8 * 8;
  if (i < rows) matvec_tail(m_cols, x, y, rows, cols, i);
}

// ---- table lookups (quantize, dequantize) ------------------------------------

// A float table of up to 8 * Regs entries (Regs = 1, 2, 4) in ymm, looked up
// per lane: permutevar8x32 in each register (index bits 0-2), then a blendv
// tree on index bits 3 and 4 (moved to the sign bit). Filled from `count`
// entries of t; the rest are zero. Never reads past t[count - 1].
template <int Regs>
struct LookupTable {
  LookupTable() = default;
  LookupTable(const float* t, int count) {
#pragma GCC unroll 4
    for (int r = 0; r < Regs; ++r) reg[r] = _mm256_maskload_ps(t + 8 * r, lanes_below(count - 8 * r));
  }
  __m256 operator()(__m256i idx) const {
    if constexpr (Regs == 1) {
      return _mm256_permutevar8x32_ps(reg[0], idx);
    } else {
      const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
      __m256 lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(reg[0], idx),
                                   _mm256_permutevar8x32_ps(reg[1], idx), bit3);
      if constexpr (Regs == 4) {
        const __m256 hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(reg[2], idx),
                                           _mm256_permutevar8x32_ps(reg[3], idx), bit3);
        lo = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27)));
      }
      return lo;
    }
  }
  __m256 reg[Regs];
};

// ---- quantize ----------------------------------------------------------------

// The reference's search visits, at step s = 2^(bits-1), ..., 2, 1, the
// boundary lo + s - 1 where lo is a multiple of 2s: so step s only ever reads
// boundaries[(2m + 1)s - 1] for m = lo / 2s < 2^(bits-1) / s. The first five
// steps therefore need at most 16 distinct boundaries each; each gets its own
// small table, indexed by lo >> log2(2s): one permute for the first four
// steps, two and a blend for the fifth. Deeper steps (6 bits and up) gather
// boundaries[lo + s - 1] directly. The tables are built once per call, by
// permutes from the whole boundary table up to 5 bits, by gathers above.
template <int Bits>
struct SearchTables {
  static constexpr int kTableSteps = Bits < 5 ? Bits : 5;

  explicit SearchTables(const float* b) : b_(b) {
    if constexpr (Bits <= 5) {
      const LookupTable<(Bits <= 4 ? 2 : 4)> whole(b, (1 << Bits) - 1);
      fill([&](__m256i idx) { return whole(idx); });
    } else {
      fill([&](__m256i idx) { return _mm256_i32gather_ps(b, idx, 4); });
    }
  }

  // Entries m0 .. m0 + 7 (cyclic in m < 2^t) of step t's table, as indices
  // into the boundaries: (2m + 1)s - 1 = (m << log2(2s)) + s - 1.
  static __m256i step_index(int t, int m0) {
    const __m256i m = _mm256_and_si256(
        _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(m0)),
        _mm256_set1_epi32((1 << t) - 1));
    return _mm256_add_epi32(_mm256_slli_epi32(m, Bits - t), _mm256_set1_epi32((1 << (Bits - 1 - t)) - 1));
  }
  template <class Get>
  void fill(Get get) {
    for (int t = 0; t < kTableSteps && t < 4; ++t) tab_[t] = get(step_index(t, 0));
    if (kTableSteps == 5) {
      last_.reg[0] = get(step_index(4, 0));
      last_.reg[1] = get(step_index(4, 8));
    }
  }

  // boundaries[lo + s - 1] for step t (s = 2^(Bits-1-t)), per lane.
  __m256 bound(int t, __m256i lo) const {
    const int s = 1 << (Bits - 1 - t);
    if (t == 0) return tab_[0];  // every lane compares with boundaries[s - 1]
    if (t < 4 && t < kTableSteps) return _mm256_permutevar8x32_ps(tab_[t], _mm256_srli_epi32(lo, Bits - t));
    if (t == 4) return last_(_mm256_srli_epi32(lo, Bits - t));
    return _mm256_i32gather_ps(b_, _mm256_add_epi32(lo, _mm256_set1_epi32(s - 1)), 4);
  }

  const float* b_;
  __m256 tab_[4] = {};
  LookupTable<2> last_{};  // step 4 (16 entries); unused below 5 bits
};

// The reference's search, 8 lanes at a time: lo += s where
// boundaries[lo + s - 1] < v (ordered compare: NaN never counts).
template <int Bits>
inline __m256i search(__m256 v, const SearchTables<Bits>& tables) {
  __m256i lo = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int t = 0; t < Bits; ++t) {
    const __m256 below = _mm256_cmp_ps(tables.bound(t, lo), v, _CMP_LT_OQ);
    lo = _mm256_add_epi32(
        lo, _mm256_and_si256(_mm256_castps_si256(below), _mm256_set1_epi32(1 << (Bits - 1 - t))));
  }
  return lo;
}

// Eight int32 codes (each < 256) -> eight bytes in the low half.
inline __m128i narrow_to_bytes(__m256i c) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  return _mm_packus_epi16(w, w);
}

template <int Bits>
void quantize_bits(const float* x, int n, float mul, const float* boundaries, uint8_t* codes) {
  const SearchTables<Bits> tables(boundaries);
  const __m256 vm = _mm256_set1_ps(mul);
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i c0 = search<Bits>(_mm256_mul_ps(_mm256_loadu_ps(x + i), vm), tables);
    const __m256i c1 = search<Bits>(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vm), tables);
    const __m128i w0 = _mm_packus_epi32(_mm256_castsi256_si128(c0), _mm256_extracti128_si256(c0, 1));
    const __m128i w1 = _mm_packus_epi32(_mm256_castsi256_si128(c1), _mm256_extracti128_si256(c1, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(w0, w1));
  }
  for (; i < n; i += 8) {
    const __m256i m = lanes_below(n - i);
    const __m256i c = search<Bits>(_mm256_mul_ps(_mm256_maskload_ps(x + i, m), vm), tables);
    const uint64_t bytes = static_cast<uint64_t>(_mm_cvtsi128_si64(narrow_to_bytes(c)));
    std::memcpy(codes + i, &bytes, n - i < 8 ? n - i : 8);
  }
}

void quantize_avx2(const float* x, int n, float mul, const float* boundaries, int bits,
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

// Up to 5 bits the centroids fit in 1, 2 or 4 ymm. Beyond, the reference's
// scalar loads are fastest: a ymm gather is slower than them on Zen 4 (47 vs
// 37 ns per 128 codes), and an 8-32 register permute tree is no faster. (The
// reference function itself, not a copy here: compiled with -mavx2 GCC turns
// the copy's loop into gathers.)
template <int Bits>
void dequantize_bits(const uint8_t* codes, int n, const float* centroids, float* out) {
  constexpr int kRegs = Bits <= 3 ? 1 : (1 << Bits) / 8;
  const LookupTable<kRegs> lookup(centroids, 1 << Bits);
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i));
    _mm256_storeu_ps(out + i, lookup(_mm256_cvtepu8_epi32(c)));
    _mm256_storeu_ps(out + i + 8, lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))));
  }
  for (; i < n; ++i) out[i] = centroids[codes[i]];
}

void dequantize_avx2(const uint8_t* codes, int n, const float* centroids, int bits, float* out) {
  switch (bits) {
    case 1: dequantize_bits<1>(codes, n, centroids, out); return;
    case 2: dequantize_bits<2>(codes, n, centroids, out); return;
    case 3: dequantize_bits<3>(codes, n, centroids, out); return;
    case 4: dequantize_bits<4>(codes, n, centroids, out); return;
    case 5: dequantize_bits<5>(codes, n, centroids, out); return;
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
    for (; i + 32 <= n; i += 32) {
      // Bit 0 of each byte to bit 7 (a 16-bit shift cannot carry into it: codes < 2).
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i));
      const uint32_t bits = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(v, 7)));
      std::memcpy(out + i / 8, &bits, 4);
    }
  } else if constexpr (B == 2) {
    for (; i + 32 <= n; i += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i));
      const __m256i pairs = _mm256_maddubs_epi16(v, _mm256_set1_epi16(0x0401));     // c0 + 4 c1
      const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi32(0x00100001));  // + 16 (c2 + 4 c3)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i / 4), narrow_to_bytes(quads));
    }
  } else if constexpr (B == 4) {
    for (; i + 32 <= n; i += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i));
      const __m256i pairs = _mm256_maddubs_epi16(v, _mm256_set1_epi16(0x1001));  // c0 + 16 c1
      const __m128i bytes =
          _mm_packus_epi16(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), bytes);
    }
  }
  return i;
}

template <int B>
size_t unpack_simd(const uint8_t* in, size_t n, uint8_t* codes) {
  size_t i = 0;
  if constexpr (B == 1) {
    // Input byte k to output bytes 8k..8k+7, then test bit (j % 8) in byte j.
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
    for (; i + 32 <= n; i += 32) {
      int32_t word;
      std::memcpy(&word, in + i / 8, 4);
      const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(word), spread), bit);
      const __m256i c = _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), c);
    }
  } else if constexpr (B == 2) {
    for (; i + 32 <= n; i += 32) {
      // One input byte per dword; move its 2-bit fields to the dword's 4 bytes.
      const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + i / 4)));
      __m256i t = _mm256_or_si256(d, _mm256_slli_epi32(d, 6));
      t = _mm256_or_si256(t, _mm256_slli_epi32(d, 12));
      t = _mm256_or_si256(t, _mm256_slli_epi32(d, 18));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i),
                          _mm256_and_si256(t, _mm256_set1_epi32(0x03030303)));
    }
  } else if constexpr (B == 4) {
    for (; i + 32 <= n; i += 32) {
      // One input byte per word; low nibble to the low byte, high to the high.
      const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i / 2)));
      const __m256i t = _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi16(0x000F)),
                                        _mm256_and_si256(_mm256_slli_epi16(w, 4), _mm256_set1_epi16(0x0F00)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), t);
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

void pack_avx2(const uint8_t* codes, size_t n, int bits, uint8_t* out) {
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

void unpack_avx2(const uint8_t* in, size_t n, int bits, uint8_t* codes) {
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
constexpr Kernels kAvx2{SimdLevel::avx2, sum_squares_avx2, dot_avx2,        scale_avx2,
                        mul_signs_avx2,  fwht_avx2,        matvec_avx2,     quantize_avx2,
                        dequantize_avx2, pack_avx2,        unpack_avx2};

}  // namespace

__attribute__((target("arch=x86-64"))) const Kernels* kernels_avx2() {
  static const bool ok = cpu_supports(SimdLevel::avx2);
  return ok ? &kAvx2 : nullptr;
}

}  // namespace tq::kernels
