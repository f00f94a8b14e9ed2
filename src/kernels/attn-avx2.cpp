// AVX2 (+ FMA, F16C, BMI2) attention-on-records kernels; agree with
// attn_kernels_ref.cpp within floating-point tolerance (sums reordered, FMA).
//
// Same structure as attn-avx512.cpp with 8-lane chunks (d a multiple of 8;
// other d fall back to the reference):
//  - tq-mse codes: 8 codes -> pdep -> bytes -> dwords -> centroids by
//    vpermps (bits <= 3), two vpermps + blend on bit 3 (bits = 4), or a
//    gather (bits >= 5);
//  - dense f32 / f16 (vcvtph2ps) / bf16 (zero-extend, shift left 16);
//  - score: 8 ymm accumulators (G heads x R records), one hadd tree;
//  - accumulate: blocks of 32 records, G x C = 8 ymm of output in registers.
//
// Nothing here may run before attn_kernels_avx2() has checked the CPU, and no
// inline library code is instantiated (see kernels-avx2.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "kernels/attn_kernels.hpp"
#include "kernels/cpu_features.hpp"

namespace tq::kernels {
namespace {

constexpr uint64_t kPdepMask[9] = {0,
                                   0x0101010101010101ull,
                                   0x0303030303030303ull,
                                   0x0707070707070707ull,
                                   0x0f0f0f0f0f0f0f0full,
                                   0x1f1f1f1f1f1f1f1full,
                                   0x3f3f3f3f3f3f3f3full,
                                   0x7f7f7f7f7f7f7f7full,
                                   0xffffffffffffffffull};

template <int N>
inline uint64_t load_le(const uint8_t* p) {
  if constexpr (N == 1) {
    return p[0];
  } else {
    using U = std::conditional_t<N == 2, uint16_t, std::conditional_t<N == 4, uint32_t, uint64_t>>;
    U v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
}

// N (1..8) little-endian bytes as one integer, from power-of-two loads only
// (a memcpy of 3/5/6/7 bytes goes through the stack and stalls store forwarding).
template <int N>
inline uint64_t load_bytes(const uint8_t* p) {
  if constexpr (N == 1 || N == 2 || N == 4 || N == 8) return load_le<N>(p);
  else if constexpr (N == 3) return load_le<2>(p) | load_le<1>(p + 2) << 16;
  else if constexpr (N == 5) return load_le<4>(p) | load_le<1>(p + 4) << 32;
  else if constexpr (N == 6) return load_le<4>(p) | load_le<2>(p + 4) << 32;
  else return load_le<4>(p) | load_le<4>(p + 3) << 24;  // N == 7: byte 3 read twice
}

inline float load_scale(const uint8_t* p, bool f32) {
  if (f32) {
    float s;
    std::memcpy(&s, p, sizeof s);
    return s;
  }
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return _cvtsh_ss(h);
}

// Codes 8c .. 8c+7 of a record as 8 dwords: bytes [Bc, Bc + B).
template <int B>
inline __m256i codes8(const uint8_t* rec, int c) {
  const uint8_t* p = rec + size_t(B) * c;
  uint64_t x = load_bytes<B>(p);
  if constexpr (B < 8) x = _pdep_u64(x, kPdepMask[B]);
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(x)));
}

template <int B>
struct CodeDec {
  static constexpr bool kScaled = true;
  __m256 t0, t1;
  const float* cent;
  size_t scale_off;
  bool scale_f32;
  CodeDec(const float* c, size_t so, bool sf) : cent(c), scale_off(so), scale_f32(sf) {
    if constexpr (B <= 3) {
      alignas(32) float t[8] = {};
      std::memcpy(t, c, sizeof(float) << B);
      t0 = t1 = _mm256_load_ps(t);
    } else if constexpr (B == 4) {
      t0 = _mm256_loadu_ps(c);
      t1 = _mm256_loadu_ps(c + 8);
    } else {
      t0 = t1 = _mm256_setzero_ps();
    }
  }
  __m256 load(const uint8_t* rec, int c) const {
    const __m256i idx = codes8<B>(rec, c);
    if constexpr (B <= 3) {
      return _mm256_permutevar8x32_ps(t0, idx);
    } else if constexpr (B == 4) {
      const __m256 lo = _mm256_permutevar8x32_ps(t0, idx);
      const __m256 hi = _mm256_permutevar8x32_ps(t1, idx);
      return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    } else {
      return _mm256_i32gather_ps(cent, idx, 4);
    }
  }
  float scale(const uint8_t* rec) const { return load_scale(rec + scale_off, scale_f32); }
};

template <int K>
struct DenseDec {
  static constexpr bool kScaled = false;
  __m256 load(const uint8_t* rec, int c) const {
    if constexpr (K == 0) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(rec + 32 * size_t(c)));
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 16 * size_t(c)));
      if constexpr (K == 1) return _mm256_cvtph_ps(h);
      else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  float scale(const uint8_t*) const { return 1.0f; }
};

// The 8 horizontal sums of y[0..7], in order.
inline __m256 reduce8(const __m256* y) {
  const __m256 h01 = _mm256_hadd_ps(y[0], y[1]), h23 = _mm256_hadd_ps(y[2], y[3]);
  const __m256 h45 = _mm256_hadd_ps(y[4], y[5]), h67 = _mm256_hadd_ps(y[6], y[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                       _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// G heads x R records (G * R == 8) per batch.
template <class Dec, int G, int R>
void score_impl(const Dec& dec, const float* q, int d, const uint8_t* recs, size_t stride, size_t n,
                float* scores) {
  static_assert(G * R == 8);
  const int nc = d / 8;
  for (size_t j0 = 0; j0 < n; j0 += R) {
    const uint8_t* rp[R];
    for (int r = 0; r < R; ++r) rp[r] = recs + (j0 + r < n ? j0 + r : n - 1) * stride;
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    for (int c = 0; c < nc; ++c) {
      __m256 qv[G];
      for (int h = 0; h < G; ++h) qv[h] = _mm256_loadu_ps(q + size_t(h) * d + 8 * c);
      for (int r = 0; r < R; ++r) {
        const __m256 x = dec.load(rp[r], c);
        for (int h = 0; h < G; ++h) acc[h * R + r] = _mm256_fmadd_ps(qv[h], x, acc[h * R + r]);
      }
    }
    alignas(32) float s[8];
    _mm256_store_ps(s, reduce8(acc));
    for (int r = 0; r < R; ++r) {
      if (j0 + r >= n) break;
      const float sc = Dec::kScaled ? dec.scale(rp[r]) : 1.0f;
      for (int h = 0; h < G; ++h) scores[h * n + j0 + r] = s[h * R + r] * sc;
    }
  }
}

template <class Dec>
void score_any(const Dec& dec, const float* q, int g, int d, const uint8_t* recs, size_t stride,
               size_t n, float* scores) {
  for (int h = 0; h < g;) {
    const int left = g - h;
    const float* qh = q + size_t(h) * d;
    float* sh = scores + size_t(h) * n;
    if (left >= 8) {
      score_impl<Dec, 8, 1>(dec, qh, d, recs, stride, n, sh);
      h += 8;
    } else if (left >= 4) {
      score_impl<Dec, 4, 2>(dec, qh, d, recs, stride, n, sh);
      h += 4;
    } else if (left >= 2) {
      score_impl<Dec, 2, 4>(dec, qh, d, recs, stride, n, sh);
      h += 2;
    } else {
      score_impl<Dec, 1, 8>(dec, qh, d, recs, stride, n, sh);
      h += 1;
    }
  }
}

constexpr int kBlock = 32;

// Output chunks c0 .. c0+C-1 of G heads over one block of records.
template <class Dec, int G, int C>
inline void acc_block(const Dec& dec, const float* ws, int bl, const uint8_t* rec0, size_t stride,
                      int d, int c0, float* acc) {
  __m256 a[G * C];
  for (int h = 0; h < G; ++h)
    for (int cc = 0; cc < C; ++cc)
      a[h * C + cc] = _mm256_loadu_ps(acc + size_t(h) * d + 8 * (c0 + cc));
  const uint8_t* rec = rec0;
  for (int jj = 0; jj < bl; ++jj, rec += stride) {
    __m256 x[C];
    for (int cc = 0; cc < C; ++cc) x[cc] = dec.load(rec, c0 + cc);
    for (int h = 0; h < G; ++h) {
      const __m256 wv = _mm256_set1_ps(ws[jj * G + h]);
      for (int cc = 0; cc < C; ++cc) a[h * C + cc] = _mm256_fmadd_ps(wv, x[cc], a[h * C + cc]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int cc = 0; cc < C; ++cc)
      _mm256_storeu_ps(acc + size_t(h) * d + 8 * (c0 + cc), a[h * C + cc]);
}

template <class Dec, int G>
void accumulate_impl(const Dec& dec, const float* w, size_t wstride, int d, const uint8_t* recs,
                     size_t stride, size_t n, float* acc) {
  constexpr int C = 8 / G;
  const int nc = d / 8;
  float ws[kBlock * G];
  for (size_t j0 = 0; j0 < n; j0 += kBlock) {
    const int bl = n - j0 < size_t(kBlock) ? static_cast<int>(n - j0) : kBlock;
    const uint8_t* rec0 = recs + j0 * stride;
    for (int jj = 0; jj < bl; ++jj) {
      const float sc = Dec::kScaled ? dec.scale(rec0 + jj * stride) : 1.0f;
      for (int h = 0; h < G; ++h) ws[jj * G + h] = w[h * wstride + j0 + jj] * sc;
    }
    int c0 = 0;
    for (; c0 + C <= nc; c0 += C) acc_block<Dec, G, C>(dec, ws, bl, rec0, stride, d, c0, acc);
    for (; c0 < nc; ++c0) acc_block<Dec, G, 1>(dec, ws, bl, rec0, stride, d, c0, acc);
  }
}

template <class Dec>
void accumulate_any(const Dec& dec, const float* w, int g, int d, const uint8_t* recs,
                    size_t stride, size_t n, float* acc) {
  for (int h = 0; h < g;) {
    const int left = g - h;
    const float* wh = w + size_t(h) * n;
    float* ah = acc + size_t(h) * d;
    if (left >= 8) {
      accumulate_impl<Dec, 8>(dec, wh, n, d, recs, stride, n, ah);
      h += 8;
    } else if (left >= 4) {
      accumulate_impl<Dec, 4>(dec, wh, n, d, recs, stride, n, ah);
      h += 4;
    } else if (left >= 2) {
      accumulate_impl<Dec, 2>(dec, wh, n, d, recs, stride, n, ah);
      h += 2;
    } else {
      accumulate_impl<Dec, 1>(dec, wh, n, d, recs, stride, n, ah);
      h += 1;
    }
  }
}

void score_codes_avx2(const float* q, int g, int d, const uint8_t* recs, size_t stride, size_t n,
                        int bits, const float* centroids, size_t scale_off, bool scale_f32,
                        float* scores) {
  if (d % 8 != 0 || n == 0 || bits < 1 || bits > 8) {
    attn_kernels_ref().score_codes(q, g, d, recs, stride, n, bits, centroids, scale_off, scale_f32,
                                   scores);
    return;
  }
  switch (bits) {
#define TQ_CASE(B)                                                                        \
  case B:                                                                                 \
    score_any(CodeDec<B>(centroids, scale_off, scale_f32), q, g, d, recs, stride, n, scores); \
    return;
    TQ_CASE(1) TQ_CASE(2) TQ_CASE(3) TQ_CASE(4) TQ_CASE(5) TQ_CASE(6) TQ_CASE(7) TQ_CASE(8)
#undef TQ_CASE
  }
}

void accumulate_codes_avx2(const float* w, int g, int d, const uint8_t* recs, size_t stride,
                             size_t n, int bits, const float* centroids, size_t scale_off,
                             bool scale_f32, float* acc) {
  if (d % 8 != 0 || n == 0 || bits < 1 || bits > 8) {
    attn_kernels_ref().accumulate_codes(w, g, d, recs, stride, n, bits, centroids, scale_off,
                                        scale_f32, acc);
    return;
  }
  switch (bits) {
#define TQ_CASE(B)                                                                              \
  case B:                                                                                       \
    accumulate_any(CodeDec<B>(centroids, scale_off, scale_f32), w, g, d, recs, stride, n, acc); \
    return;
    TQ_CASE(1) TQ_CASE(2) TQ_CASE(3) TQ_CASE(4) TQ_CASE(5) TQ_CASE(6) TQ_CASE(7) TQ_CASE(8)
#undef TQ_CASE
  }
}

void score_dense_avx2(int kind, const float* q, int g, int d, const uint8_t* recs, size_t stride,
                        size_t n, float* scores) {
  if (d % 8 != 0 || n == 0 || kind < 0 || kind > 2) {
    attn_kernels_ref().score_dense(kind, q, g, d, recs, stride, n, scores);
    return;
  }
  switch (kind) {
    case 0: score_any(DenseDec<0>{}, q, g, d, recs, stride, n, scores); return;
    case 1: score_any(DenseDec<1>{}, q, g, d, recs, stride, n, scores); return;
    default: score_any(DenseDec<2>{}, q, g, d, recs, stride, n, scores); return;
  }
}

void accumulate_dense_avx2(int kind, const float* w, int g, int d, const uint8_t* recs,
                             size_t stride, size_t n, float* acc) {
  if (d % 8 != 0 || n == 0 || kind < 0 || kind > 2) {
    attn_kernels_ref().accumulate_dense(kind, w, g, d, recs, stride, n, acc);
    return;
  }
  switch (kind) {
    case 0: accumulate_any(DenseDec<0>{}, w, g, d, recs, stride, n, acc); return;
    case 1: accumulate_any(DenseDec<1>{}, w, g, d, recs, stride, n, acc); return;
    default: accumulate_any(DenseDec<2>{}, w, g, d, recs, stride, n, acc); return;
  }
}

// Constant-initialised: no code from this file runs before the CPU check.
// exp(x) for x <= 0 as in attn-avx512.cpp, with 2^i built in the exponent
// field: x is clamped at -87 so i + 127 >= 1 (exp(-87) ~ 1.6e-38 stands in for 0).
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 i = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(i, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(i, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

void softmax_chunk_avx2(float* s, int g, size_t n, float scale, float* m, float* l, float* corr) {
  const __m256 vs = _mm256_set1_ps(scale);
  const size_t n8 = n & ~size_t(7);
  for (int h = 0; h < g; ++h) {
    float* sh = s + size_t(h) * n;
    __m256 mx = _mm256_set1_ps(-__builtin_inff());
    for (size_t j = 0; j < n8; j += 8) mx = _mm256_max_ps(mx, _mm256_mul_ps(_mm256_loadu_ps(sh + j), vs));
    float m_new = hmax8(mx);
    for (size_t j = n8; j < n; ++j) m_new = sh[j] * scale > m_new ? sh[j] * scale : m_new;
    const float m_old = m[h];
    m_new = m_new > m_old ? m_new : m_old;
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
    for (size_t j = 0; j < n8; j += 8) {
      const __m256 w = exp_nonpositive(_mm256_fmsub_ps(_mm256_loadu_ps(sh + j), vs, vm));
      _mm256_storeu_ps(sh + j, w);
      sum = _mm256_add_ps(sum, w);
    }
    float total = hsum8(sum);
    for (size_t j = n8; j < n; ++j) {
      const float w = _mm256_cvtss_f32(exp_nonpositive(_mm256_set1_ps(sh[j] * scale - m_new)));
      sh[j] = w;
      total += w;
    }
    const float c = m_old == m_new ? 1.0f
                    : m_old == -__builtin_inff()
                        ? 0.0f
                        : _mm256_cvtss_f32(exp_nonpositive(_mm256_set1_ps(m_old - m_new)));
    corr[h] = c;
    l[h] = l[h] * c + total;
    m[h] = m_new;
  }
}

constexpr AttnKernels kAttnAvx2{SimdLevel::avx2,       score_codes_avx2,
                                accumulate_codes_avx2,  score_dense_avx2,
                                accumulate_dense_avx2,  nullptr,
                                nullptr,                nullptr,
                                nullptr,                softmax_chunk_avx2,
                                nullptr};

}  // namespace

__attribute__((target("arch=x86-64"))) const AttnKernels* attn_kernels_avx2() {
  static const bool ok = cpu_supports(SimdLevel::avx2);
  return ok ? &kAttnAvx2 : nullptr;
}

}  // namespace tq::kernels
