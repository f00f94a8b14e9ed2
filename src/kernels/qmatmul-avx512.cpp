// AVX-512 (F/BW/VL/DQ) quantized matmul; agrees with qmatmul_ref.cpp within
// floating-point tolerance (sums reordered, FMA in decode and dot).
//
// Fused decode + multiply-add: every weight block is decoded straight into
// zmm registers (16 floats each) and used at once for up to 4 tokens, never
// stored. One tile is NR rows x NT tokens with two accumulators per pair (the
// even / odd vectors of a block), so even n = 1 has 8 independent FMA chains.
//  - 4-bit legacy blocks: 16 bytes -> vpmovzxbd -> low nibbles are elements
//    0..15, high nibbles (srl 4) elements 16..31; Q4_0/Q4_1/Q4_K turn them
//    into floats by a vpermps lookup in the block's 16 weights; the fifth bit of
//    Q5_0/Q5_1 is a mask register (bit j of qh) or-ing 16 into lane j;
//  - K-quants: sub-block scales and mins unpacked once per 256-element
//    super-block (to floats d*sc, dmin*m), then 64 elements per step;
//  - q * d + m (and q * d - m) is one FMA: one rounding instead of the
//    reference's two;
//  - f32 / f16 (vcvtph2ps) / bf16 rows are 32-element "blocks".
//
// Like kernels-avx512.cpp: nothing here may run before qmatmul_avx512() has
// checked the CPU (the table is constant-initialised data, the check is
// compiled for plain x86-64), and no inline library code is instantiated here
// (its COMDAT copy, compiled with these flags, could be picked for the whole
// program) -- raw arrays and memcpy only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstring>

#include "kernels/cpu_features.hpp"
#include "kernels/qmatmul.hpp"

#define TQ_INLINE inline __attribute__((always_inline))

namespace tq::kernels {
namespace {

using V = __m512;
using I = __m512i;
constexpr int kW = 16;  // floats per vector

TQ_INLINE float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}
TQ_INLINE I u8x16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
TQ_INLINE I i8x16(const uint8_t* p) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
TQ_INLINE I lo4(I v) { return _mm512_and_si512(v, _mm512_set1_epi32(15)); }
TQ_INLINE I hi4(I v) { return _mm512_srli_epi32(v, 4); }
TQ_INLINE V cvt(I v) { return _mm512_cvtepi32_ps(v); }
TQ_INLINE V bcast(float f) { return _mm512_set1_ps(f); }

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block
// (same unpacking as ggml_blocks.cpp).
TQ_INLINE void scale_min_k4(int j, const uint8_t* q, float* sc, float* m) {
  if (j < 4) {
    *sc = float(q[j] & 63);
    *m = float(q[j + 4] & 63);
  } else {
    *sc = float((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
    *m = float((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// ---- block decoders ------------------------------------------------------------
// kElems elements in kBytes bytes; kSubs steps of kVecs vectors each.
// prep() reads a block's scales once, sub(s) decodes step s into w[kVecs].

struct DecF32 {
  static constexpr int kElems = 32, kBytes = 128, kSubs = 1, kVecs = 2;
  struct Blk {};
  static TQ_INLINE void prep(const uint8_t*, Blk&) {}
  static TQ_INLINE void sub(const uint8_t* p, const Blk&, int, V* w) {
    w[0] = _mm512_loadu_ps(p);
    w[1] = _mm512_loadu_ps(p + 64);
  }
};

struct DecF16 {
  static constexpr int kElems = 32, kBytes = 64, kSubs = 1, kVecs = 2;
  struct Blk {};
  static TQ_INLINE void prep(const uint8_t*, Blk&) {}
  static TQ_INLINE void sub(const uint8_t* p, const Blk&, int, V* w) {
    w[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    w[1] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
  }
};

struct DecBF16 {
  static constexpr int kElems = 32, kBytes = 64, kSubs = 1, kVecs = 2;
  struct Blk {};
  static TQ_INLINE void prep(const uint8_t*, Blk&) {}
  static TQ_INLINE V one(const uint8_t* p) {
    const I v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
  static TQ_INLINE void sub(const uint8_t* p, const Blk&, int, V* w) {
    w[0] = one(p);
    w[1] = one(p + 32);
  }
};

// 4-bit types decode through a 16-entry table of the block's 16 possible
// weights (one FMA builds it): vpermps picks lane q from it, using only the
// low 4 bits of each index, so the low nibble needs no mask and no int->float
// conversion is left -- the same value q * d + m (one rounding) as an FMA.
TQ_INLINE V iota16() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
TQ_INLINE V lut(I q, V table) { return _mm512_permutexvar_ps(q, table); }

struct DecQ4_0 {  // d, qs[16]: (q - 8) * d
  static constexpr int kElems = 32, kBytes = 18, kSubs = 1, kVecs = 2;
  struct Blk { V t; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) {
    b.t = _mm512_mul_ps(_mm512_sub_ps(iota16(), _mm512_set1_ps(8.0f)), bcast(f16_at(p)));
  }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int, V* w) {
    const I v = u8x16(p + 2);
    w[0] = lut(v, b.t);
    w[1] = lut(hi4(v), b.t);
  }
};

struct DecQ4_1 {  // d, m, qs[16]: q * d + m
  static constexpr int kElems = 32, kBytes = 20, kSubs = 1, kVecs = 2;
  struct Blk { V t; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) {
    // d and m in one 4-byte broadcast: halves d, m, d, m, ... -> floats.
    uint32_t dm;
    std::memcpy(&dm, p, 4);
    const V f = _mm512_cvtph_ps(_mm256_set1_epi32(int(dm)));
    b.t = _mm512_fmadd_ps(iota16(), _mm512_permute_ps(f, 0x00), _mm512_permute_ps(f, 0x55));
  }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int, V* w) {
    const I v = u8x16(p + 4);
    w[0] = lut(v, b.t);
    w[1] = lut(hi4(v), b.t);
  }
};

// The fifth bit of element j is bit j of qh: lane j of the low half, lane
// j - 16 of the high half.
TQ_INLINE void q5_bits(const uint8_t* qh_p, const uint8_t* qs, I* lo, I* hi) {
  uint32_t qh;
  std::memcpy(&qh, qh_p, 4);
  const I v = u8x16(qs), sixteen = _mm512_set1_epi32(16);
  const I l = lo4(v), h = hi4(v);
  *lo = _mm512_mask_or_epi32(l, __mmask16(qh & 0xffff), l, sixteen);
  *hi = _mm512_mask_or_epi32(h, __mmask16(qh >> 16), h, sixteen);
}

struct DecQ5_0 {  // d, qh[4], qs[16]: (q - 16) * d
  static constexpr int kElems = 32, kBytes = 22, kSubs = 1, kVecs = 2;
  struct Blk { V d; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) { b.d = bcast(f16_at(p)); }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int, V* w) {
    I lo, hi;
    q5_bits(p + 2, p + 6, &lo, &hi);
    const I sixteen = _mm512_set1_epi32(16);
    w[0] = _mm512_mul_ps(cvt(_mm512_sub_epi32(lo, sixteen)), b.d);
    w[1] = _mm512_mul_ps(cvt(_mm512_sub_epi32(hi, sixteen)), b.d);
  }
};

struct DecQ5_1 {  // d, m, qh[4], qs[16]: q * d + m
  static constexpr int kElems = 32, kBytes = 24, kSubs = 1, kVecs = 2;
  struct Blk { V d, m; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) {
    b.d = bcast(f16_at(p));
    b.m = bcast(f16_at(p + 2));
  }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int, V* w) {
    I lo, hi;
    q5_bits(p + 4, p + 8, &lo, &hi);
    w[0] = _mm512_fmadd_ps(cvt(lo), b.d, b.m);
    w[1] = _mm512_fmadd_ps(cvt(hi), b.d, b.m);
  }
};

template <int kOff, int kSize>
struct DecQ8 {  // d, [s,] qs[32]: q * d  (Q8_0: qs at 2; Q8_1: at 4)
  static constexpr int kElems = 32, kBytes = kSize, kSubs = 1, kVecs = 2;
  struct Blk { V d; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) { b.d = bcast(f16_at(p)); }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int, V* w) {
    w[0] = _mm512_mul_ps(cvt(i8x16(p + kOff)), b.d);
    w[1] = _mm512_mul_ps(cvt(i8x16(p + kOff + 16)), b.d);
  }
};
using DecQ8_0 = DecQ8<2, 34>;
using DecQ8_1 = DecQ8<4, 36>;

// Q4_K / Q5_K: step g covers elements 64g .. 64g+63 = sub-blocks 2g (low
// nibbles of qs[32g .. 32g+31]) and 2g+1 (high nibbles of the same bytes).
struct KScales {
  float d[8], m[8];  // d * sc_j, dmin * m_j
};
TQ_INLINE void k_scales(const uint8_t* p, KScales& b) {
  const float d = f16_at(p), dmin = f16_at(p + 2);
  for (int j = 0; j < 8; ++j) {
    float sc, m;
    scale_min_k4(j, p + 4, &sc, &m);
    b.d[j] = d * sc;
    b.m[j] = dmin * m;
  }
}

struct DecQ4_K {  // d, dmin, scales[12], qs[128]: d*sc * q - dmin*m
  static constexpr int kElems = 256, kBytes = 144, kSubs = 4, kVecs = 4;
  using Blk = KScales;
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) { k_scales(p, b); }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int g, V* w) {
    const uint8_t* q = p + 16 + 32 * g;
    const I v0 = u8x16(q), v1 = u8x16(q + 16);
    const V t1 = _mm512_fmsub_ps(iota16(), bcast(b.d[2 * g]), bcast(b.m[2 * g]));
    const V t2 = _mm512_fmsub_ps(iota16(), bcast(b.d[2 * g + 1]), bcast(b.m[2 * g + 1]));
    w[0] = lut(v0, t1);
    w[1] = lut(v1, t1);
    w[2] = lut(hi4(v0), t2);
    w[3] = lut(hi4(v1), t2);
  }
};

struct DecQ5_K {  // d, dmin, scales[12], qh[32], qs[128]; bit 2g / 2g+1 of qh[l]
  static constexpr int kElems = 256, kBytes = 176, kSubs = 4, kVecs = 4;
  using Blk = KScales;
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) { k_scales(p, b); }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int g, V* w) {
    const uint8_t* q = p + 48 + 32 * g;
    const I v0 = u8x16(q), v1 = u8x16(q + 16);
    const I h0 = u8x16(p + 16), h1 = u8x16(p + 32), sixteen = _mm512_set1_epi32(16);
    const I b1 = _mm512_set1_epi32(1 << (2 * g)), b2 = _mm512_set1_epi32(2 << (2 * g));
    auto with = [&](I q4, I h, I bit) {
      return cvt(_mm512_mask_or_epi32(q4, _mm512_test_epi32_mask(h, bit), q4, sixteen));
    };
    const V d1 = bcast(b.d[2 * g]), m1 = bcast(b.m[2 * g]);
    const V d2 = bcast(b.d[2 * g + 1]), m2 = bcast(b.m[2 * g + 1]);
    w[0] = _mm512_fmsub_ps(with(lo4(v0), h0, b1), d1, m1);
    w[1] = _mm512_fmsub_ps(with(lo4(v1), h1, b1), d1, m1);
    w[2] = _mm512_fmsub_ps(with(hi4(v0), h0, b2), d2, m2);
    w[3] = _mm512_fmsub_ps(with(hi4(v1), h1, b2), d2, m2);
  }
};

// Q6_K: ql[128], qh[64], scales[16] (int8), d. Step k (0..3) covers elements
// 64k .. 64k+63: half = k / 2 selects ql[64 half ..], qh[32 half ..]; hi = k % 2
// selects the nibble of ql and bits (4 hi, 4 hi + 1) / (4 hi + 2, 4 hi + 3) of
// qh. Each 16 lanes share one scale; w = (d * sc) * (q - 32), as the reference.
struct DecQ6_K {
  static constexpr int kElems = 256, kBytes = 210, kSubs = 4, kVecs = 4;
  struct Blk { float ds[16]; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) {
    const float d = f16_at(p + 208);
    for (int j = 0; j < 16; ++j) b.ds[j] = d * float(int8_t(p[192 + j]));
  }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int k, V* w) {
    const int half = k >> 1, hi = k & 1;
    const uint8_t* ql = p + 64 * half;
    const uint8_t* qh = p + 128 + 32 * half;
    const I h0 = u8x16(qh), h1 = u8x16(qh + 16);
    const I three = _mm512_set1_epi32(3), off = _mm512_set1_epi32(32);
    auto one = [&](const uint8_t* l, I h, int shift, int s) {
      const I v = u8x16(l);
      const I nib = hi ? hi4(v) : lo4(v);
      const I top = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, shift), three), 4);
      const I q = _mm512_sub_epi32(_mm512_or_si512(nib, top), off);
      return _mm512_mul_ps(cvt(q), bcast(b.ds[8 * half + 4 * hi + s]));
    };
    w[0] = one(ql, h0, 4 * hi, 0);
    w[1] = one(ql + 16, h1, 4 * hi, 1);
    w[2] = one(ql + 32, h0, 4 * hi + 2, 2);
    w[3] = one(ql + 48, h1, 4 * hi + 2, 3);
  }
};

struct DecQ8_K {  // float d, qs[256], bsums[16]: d * q
  static constexpr int kElems = 256, kBytes = 292, kSubs = 8, kVecs = 2;
  struct Blk { V d; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) {
    float d;
    std::memcpy(&d, p, 4);
    b.d = bcast(d);
  }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int s, V* w) {
    w[0] = _mm512_mul_ps(cvt(i8x16(p + 4 + 32 * s)), b.d);
    w[1] = _mm512_mul_ps(cvt(i8x16(p + 20 + 32 * s)), b.d);
  }
};

// ---- the tile: NR rows x NT tokens -------------------------------------------------

// Software prefetch distance beyond the next tile (bytes); see tile().
constexpr size_t kPrefetchAhead = 2048;

// y[t * ldy + r] = W[r, :] . x[t, :] for r < NR, t < NT. w: NR rows of rb bytes,
// nb blocks each; x: [NT, cols].
template <class D, int NR, int NT>
void tile(const uint8_t* w, size_t rb, int nb, const float* x, int cols, float* y, size_t ldy) {
  V acc[NR][NT][2];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) acc[r][t][0] = acc[r][t][1] = _mm512_setzero_ps();
  // The NR rows are NR short streams (a few hundred bytes each), too short
  // for the hardware prefetcher to lock on; the tile's rows are contiguous, so
  // prefetch the bytes of the tiles ahead at the pace this one is consumed.
  const uint8_t* ahead = w + size_t(NR) * rb + kPrefetchAhead;
  for (int b = 0; b < nb; ++b) {
#pragma GCC unroll 16
    for (int off = 0; off < NR * D::kBytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + size_t(b) * NR * D::kBytes + off),
                   _MM_HINT_T0);
    const uint8_t* p[NR];
    typename D::Blk blk[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      p[r] = w + size_t(r) * rb + size_t(b) * D::kBytes;
      D::prep(p[r], blk[r]);
    }
#pragma GCC unroll 16
    for (int s = 0; s < D::kSubs; ++s) {
      const int c0 = b * D::kElems + s * D::kVecs * kW;
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        V wv[D::kVecs];
        D::sub(p[r], blk[r], s, wv);
#pragma GCC unroll 16
        for (int t = 0; t < NT; ++t) {
          const float* xp = x + size_t(t) * cols + c0;
#pragma GCC unroll 16
          for (int v = 0; v < D::kVecs; ++v)
            acc[r][t][v & 1] = _mm512_fmadd_ps(wv[v], _mm512_loadu_ps(xp + v * kW), acc[r][t][v & 1]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t)
      y[size_t(t) * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]));
}

// All rows for one group of NT tokens; more rows per tile when few tokens
// share it, so n = 1 still has 8 accumulators (4 rows x 2).
template <class D, int NT>
void rows_pass(const uint8_t* w, size_t rb, int rows, int nb, const float* x, int cols, float* y,
               size_t ldy) {
  constexpr int NR = NT <= 2 ? 4 : 2;
  int r = 0;
  for (; r + NR <= rows; r += NR) tile<D, NR, NT>(w + size_t(r) * rb, rb, nb, x, cols, y + r, ldy);
  for (; r < rows; ++r) tile<D, 1, NT>(w + size_t(r) * rb, rb, nb, x, cols, y + r, ldy);
}

// Token groups outermost: the caller's rows (one task) stay in L1/L2 while
// each group of 4 tokens passes over them.
template <class D>
void qmatmul(const uint8_t* w, size_t rb, int rows, int cols, const float* x, int n, float* y,
             size_t ldy) {
  const int nb = cols / D::kElems;
  int t = 0;
  for (; t + 4 <= n; t += 4)
    rows_pass<D, 4>(w, rb, rows, nb, x + size_t(t) * cols, cols, y + size_t(t) * ldy, ldy);
  const float* xt = x + size_t(t) * cols;
  float* yt = y + size_t(t) * ldy;
  switch (n - t) {
    case 1: rows_pass<D, 1>(w, rb, rows, nb, xt, cols, yt, ldy); break;
    case 2: rows_pass<D, 2>(w, rb, rows, nb, xt, cols, yt, ldy); break;
    case 3: rows_pass<D, 3>(w, rb, rows, nb, xt, cols, yt, ldy); break;
    default: break;
  }
}

constexpr QMatmulKernels kQMatmulAvx512{
    SimdLevel::avx512,   qmatmul<DecF32>,  qmatmul<DecF16>,  qmatmul<DecBF16>, qmatmul<DecQ4_0>,
    qmatmul<DecQ4_1>,    qmatmul<DecQ5_0>, qmatmul<DecQ5_1>, qmatmul<DecQ8_0>, qmatmul<DecQ8_1>,
    qmatmul<DecQ4_K>,    qmatmul<DecQ5_K>, qmatmul<DecQ6_K>, qmatmul<DecQ8_K>};

}  // namespace

__attribute__((target("arch=x86-64"))) const QMatmulKernels* qmatmul_avx512() {
  static const bool ok = cpu_supports(SimdLevel::avx512);
  return ok ? &kQMatmulAvx512 : nullptr;
}

}  // namespace tq::kernels
