// AVX2 (+ FMA, F16C) quantized matmul; agrees with qmatmul_ref.cpp within
// floating-point tolerance (sums reordered, FMA in decode and dot).
//
// Same scheme as qmatmul-avx512.cpp with 8-lane ymm vectors: each weight
// block is decoded into registers (8 bytes -> vpmovzxbd -> nibbles -> cvt) and
// multiply-added at once into up to 4 tokens. The fifth bit of Q5_0/Q5_1
// lane j is (qh >> j) & 1 by a variable shift (no mask registers here). Only
// 16 ymm registers: tiles are smaller than on AVX-512 (NR x NT x 2
// accumulators <= 8) and each row's block is decoded just before its FMAs.
//
// Nothing here may run before qmatmul_avx2() has checked the CPU, and no
// inline library code is instantiated (see kernels-avx2.cpp).
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

using V = __m256;
using I = __m256i;
constexpr int kW = 8;  // floats per vector

TQ_INLINE float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}
TQ_INLINE I u8x8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
TQ_INLINE I i8x8(const uint8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
TQ_INLINE I lo4(I v) { return _mm256_and_si256(v, _mm256_set1_epi32(15)); }
TQ_INLINE I hi4(I v) { return _mm256_srli_epi32(v, 4); }
TQ_INLINE V cvt(I v) { return _mm256_cvtepi32_ps(v); }
TQ_INLINE V bcast(float f) { return _mm256_set1_ps(f); }

TQ_INLINE float reduce8(V v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

TQ_INLINE void scale_min_k4(int j, const uint8_t* q, float* sc, float* m) {
  if (j < 4) {
    *sc = float(q[j] & 63);
    *m = float(q[j + 4] & 63);
  } else {
    *sc = float((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
    *m = float((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// ---- block decoders (see qmatmul-avx512.cpp) -----------------------------------

struct DecF32 {
  static constexpr int kElems = 32, kBytes = 128, kSubs = 1, kVecs = 4;
  struct Blk {};
  static TQ_INLINE void prep(const uint8_t*, Blk&) {}
  static TQ_INLINE void sub(const uint8_t* p, const Blk&, int, V* w) {
    for (int i = 0; i < 4; ++i) w[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(p) + 8 * i);
  }
};

struct DecF16 {
  static constexpr int kElems = 32, kBytes = 64, kSubs = 1, kVecs = 4;
  struct Blk {};
  static TQ_INLINE void prep(const uint8_t*, Blk&) {}
  static TQ_INLINE void sub(const uint8_t* p, const Blk&, int, V* w) {
    for (int i = 0; i < 4; ++i)
      w[i] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)));
  }
};

struct DecBF16 {
  static constexpr int kElems = 32, kBytes = 64, kSubs = 1, kVecs = 4;
  struct Blk {};
  static TQ_INLINE void prep(const uint8_t*, Blk&) {}
  static TQ_INLINE void sub(const uint8_t* p, const Blk&, int, V* w) {
    for (int i = 0; i < 4; ++i) {
      const I v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)));
      w[i] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
  }
};

// Elements 0..31 of a 4-bit legacy block as 4 x 8 lanes of integers.
TQ_INLINE void nibbles(const uint8_t* qs, I* q) {
  const I a = u8x8(qs), b = u8x8(qs + 8);
  q[0] = lo4(a);
  q[1] = lo4(b);
  q[2] = hi4(a);
  q[3] = hi4(b);
}

// Or the fifth bit (bit j of qh for element j) into q[0..3].
TQ_INLINE void fifth_bits(const uint8_t* qh_p, I* q) {
  uint32_t qh;
  std::memcpy(&qh, qh_p, 4);
  const I h = _mm256_set1_epi32(int(qh)), one = _mm256_set1_epi32(1);
  for (int i = 0; i < 4; ++i) {
    const I shifts = _mm256_setr_epi32(8 * i, 8 * i + 1, 8 * i + 2, 8 * i + 3, 8 * i + 4, 8 * i + 5,
                                       8 * i + 6, 8 * i + 7);
    const I bit = _mm256_and_si256(_mm256_srlv_epi32(h, shifts), one);
    q[i] = _mm256_or_si256(q[i], _mm256_slli_epi32(bit, 4));
  }
}

struct DecQ4_0 {
  static constexpr int kElems = 32, kBytes = 18, kSubs = 1, kVecs = 4;
  struct Blk { V d; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) { b.d = bcast(f16_at(p)); }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int, V* w) {
    I q[4];
    nibbles(p + 2, q);
    for (int i = 0; i < 4; ++i)
      w[i] = _mm256_mul_ps(cvt(_mm256_sub_epi32(q[i], _mm256_set1_epi32(8))), b.d);
  }
};

struct DecQ4_1 {
  static constexpr int kElems = 32, kBytes = 20, kSubs = 1, kVecs = 4;
  struct Blk { V d, m; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) {
    b.d = bcast(f16_at(p));
    b.m = bcast(f16_at(p + 2));
  }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int, V* w) {
    I q[4];
    nibbles(p + 4, q);
    for (int i = 0; i < 4; ++i) w[i] = _mm256_fmadd_ps(cvt(q[i]), b.d, b.m);
  }
};

struct DecQ5_0 {
  static constexpr int kElems = 32, kBytes = 22, kSubs = 1, kVecs = 4;
  struct Blk { V d; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) { b.d = bcast(f16_at(p)); }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int, V* w) {
    I q[4];
    nibbles(p + 6, q);
    fifth_bits(p + 2, q);
    for (int i = 0; i < 4; ++i)
      w[i] = _mm256_mul_ps(cvt(_mm256_sub_epi32(q[i], _mm256_set1_epi32(16))), b.d);
  }
};

struct DecQ5_1 {
  static constexpr int kElems = 32, kBytes = 24, kSubs = 1, kVecs = 4;
  struct Blk { V d, m; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) {
    b.d = bcast(f16_at(p));
    b.m = bcast(f16_at(p + 2));
  }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int, V* w) {
    I q[4];
    nibbles(p + 8, q);
    fifth_bits(p + 4, q);
    for (int i = 0; i < 4; ++i) w[i] = _mm256_fmadd_ps(cvt(q[i]), b.d, b.m);
  }
};

template <int kOff, int kSize>
struct DecQ8 {
  static constexpr int kElems = 32, kBytes = kSize, kSubs = 1, kVecs = 4;
  struct Blk { V d; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) { b.d = bcast(f16_at(p)); }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int, V* w) {
    for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(cvt(i8x8(p + kOff + 8 * i)), b.d);
  }
};
using DecQ8_0 = DecQ8<2, 34>;
using DecQ8_1 = DecQ8<4, 36>;

struct KScales {
  float d[8], m[8];
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

// Q4_K / Q5_K step g: elements 64g .. 64g+63, low then high nibbles of qs[32g ..].
struct DecQ4_K {
  static constexpr int kElems = 256, kBytes = 144, kSubs = 4, kVecs = 8;
  using Blk = KScales;
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) { k_scales(p, b); }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int g, V* w) {
    const uint8_t* q = p + 16 + 32 * g;
    const V d1 = bcast(b.d[2 * g]), m1 = bcast(b.m[2 * g]);
    const V d2 = bcast(b.d[2 * g + 1]), m2 = bcast(b.m[2 * g + 1]);
    for (int i = 0; i < 4; ++i) {
      const I v = u8x8(q + 8 * i);
      w[i] = _mm256_fmsub_ps(cvt(lo4(v)), d1, m1);
      w[4 + i] = _mm256_fmsub_ps(cvt(hi4(v)), d2, m2);
    }
  }
};

struct DecQ5_K {
  static constexpr int kElems = 256, kBytes = 176, kSubs = 4, kVecs = 8;
  using Blk = KScales;
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) { k_scales(p, b); }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int g, V* w) {
    const uint8_t* q = p + 48 + 32 * g;
    const V d1 = bcast(b.d[2 * g]), m1 = bcast(b.m[2 * g]);
    const V d2 = bcast(b.d[2 * g + 1]), m2 = bcast(b.m[2 * g + 1]);
    const I one = _mm256_set1_epi32(1);
    for (int i = 0; i < 4; ++i) {
      const I v = u8x8(q + 8 * i), h = u8x8(p + 16 + 8 * i);
      const I b1 = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2 * g), one), 4);
      const I b2 = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2 * g + 1), one), 4);
      w[i] = _mm256_fmsub_ps(cvt(_mm256_or_si256(lo4(v), b1)), d1, m1);
      w[4 + i] = _mm256_fmsub_ps(cvt(_mm256_or_si256(hi4(v), b2)), d2, m2);
    }
  }
};

// Q6_K step k: see qmatmul-avx512.cpp; vector i < 4 from ql[64 half + 8i],
// i >= 4 from ql[64 half + 32 + 8(i-4)], each with qh[32 half + 8(i%4)].
struct DecQ6_K {
  static constexpr int kElems = 256, kBytes = 210, kSubs = 4, kVecs = 8;
  struct Blk { float ds[16]; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) {
    const float d = f16_at(p + 208);
    for (int j = 0; j < 16; ++j) b.ds[j] = d * float(int8_t(p[192 + j]));
  }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int k, V* w) {
    const int half = k >> 1, hi = k & 1;
    const uint8_t* ql = p + 64 * half;
    const uint8_t* qh = p + 128 + 32 * half;
    const I three = _mm256_set1_epi32(3), off = _mm256_set1_epi32(32);
    for (int i = 0; i < 8; ++i) {
      const int j = i & 3, upper = i >> 2;
      const I v = u8x8(ql + 32 * upper + 8 * j), h = u8x8(qh + 8 * j);
      const I nib = hi ? hi4(v) : lo4(v);
      const int shift = 4 * hi + 2 * upper;
      const I top = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, shift), three), 4);
      const I q = _mm256_sub_epi32(_mm256_or_si256(nib, top), off);
      w[i] = _mm256_mul_ps(cvt(q), bcast(b.ds[8 * half + 4 * hi + 2 * upper + (j >> 1)]));
    }
  }
};

struct DecQ8_K {
  static constexpr int kElems = 256, kBytes = 292, kSubs = 8, kVecs = 4;
  struct Blk { V d; };
  static TQ_INLINE void prep(const uint8_t* p, Blk& b) {
    float d;
    std::memcpy(&d, p, 4);
    b.d = bcast(d);
  }
  static TQ_INLINE void sub(const uint8_t* p, const Blk& b, int s, V* w) {
    for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(cvt(i8x8(p + 4 + 32 * s + 8 * i)), b.d);
  }
};

// ---- the tile: NR rows x NT tokens -------------------------------------------------

// Software prefetch distance beyond the next tile (bytes); see tile().
constexpr size_t kPrefetchAhead = 2048;

template <class D, int NR, int NT>
void tile(const uint8_t* w, size_t rb, int nb, const float* x, int cols, float* y, size_t ldy) {
  V acc[NR][NT][2];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();
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
            acc[r][t][v & 1] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(xp + v * kW), acc[r][t][v & 1]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t)
      y[size_t(t) * ldy + r] = reduce8(_mm256_add_ps(acc[r][t][0], acc[r][t][1]));
}

template <class D, int NT>
void rows_pass(const uint8_t* w, size_t rb, int rows, int nb, const float* x, int cols, float* y,
               size_t ldy) {
  constexpr int NR = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  int r = 0;
  for (; r + NR <= rows; r += NR) tile<D, NR, NT>(w + size_t(r) * rb, rb, nb, x, cols, y + r, ldy);
  for (; r < rows; ++r) tile<D, 1, NT>(w + size_t(r) * rb, rb, nb, x, cols, y + r, ldy);
}

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

constexpr QMatmulKernels kQMatmulAvx2{
    SimdLevel::avx2,     qmatmul<DecF32>,  qmatmul<DecF16>,  qmatmul<DecBF16>, qmatmul<DecQ4_0>,
    qmatmul<DecQ4_1>,    qmatmul<DecQ5_0>, qmatmul<DecQ5_1>, qmatmul<DecQ8_0>, qmatmul<DecQ8_1>,
    qmatmul<DecQ4_K>,    qmatmul<DecQ5_K>, qmatmul<DecQ6_K>, qmatmul<DecQ8_K>};

}  // namespace

__attribute__((target("arch=x86-64"))) const QMatmulKernels* qmatmul_avx2() {
  static const bool ok = cpu_supports(SimdLevel::avx2);
  return ok ? &kQMatmulAvx2 : nullptr;
}

}  // namespace tq::kernels
