// AVX-512 (F/BW/VL/DQ + BMI2, F16C) attention-on-records kernels; agree with
// attn_kernels_ref.cpp within floating-point tolerance (sums reordered, FMA).
//
// What is vectorised (d a multiple of 16; other d fall back to the reference):
//  - tq-mse codes, any bits 1..8, 16 codes of a record at a time, no unpack
//    buffer, no dequantised vector. bits = 4 (d % 32 == 0): one vpmovzxbd per
//    32 codes and vpermps on each nibble, queries/accumulators permuted to
//    match (Nib4Dec); bits <= 4 otherwise: broadcast load, vpmultishiftqb
//    (VBMI) or vpshufb + vpsrlvd, vpermps on a one-zmm table; bits 5..8:
//    pdep to bytes, widen to dwords, vpermt2ps (5) or a gather (6..8).
//  - dense f32 / f16 (vcvtph2ps) / bf16 (zero-extend and shift left 16).
//  - q8_0 / q4_0 blocks (BlockDec) and tq-prod's sign sketch (SignDec, +-1 by
//    mask blend) through the same score / accumulate templates.
//  - score: R records x G heads = 16 zmm accumulators per batch (G = 8, 4, 2, 1
//    pieces of the GQA group, R = 16 / G records), q chunks loaded once per
//    chunk (from a 64-byte aligned copy) and shared by the R records; one
//    transposing shuffle tree (reduce16) reduces the 16 accumulators; the
//    record's scale multiplies the dot.
//  - accumulate: blocks of 32 records; per block the weights w * scale are
//    precomputed, and G heads x C chunks (<= 16 zmm) of the output stay in
//    registers while the block's records stream through.
//  - softmax_chunk: max, exp (polynomial + vscalefps) and sum, 16 keys a time.
// Measured versions: docs/kernel-notes.md.
//
// Like kernels-avx512.cpp: nothing here may run before attn_kernels_avx512()
// has checked the CPU, and no inline library code (std::min, containers) is
// instantiated, so the linker can never pick an AVX-512 copy for other code.
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

// Codes 16c .. 16c+15 of a record as 16 dwords: bytes [2Bc, 2Bc + 2B).
template <int B>
inline __m512i codes16(const uint8_t* rec, int c) {
  const uint8_t* p = rec + size_t(2 * B) * c;
  uint64_t lo, hi;
  if constexpr (B <= 4) {
    const uint64_t x = load_bytes<2 * B>(p);
    lo = _pdep_u64(x, kPdepMask[B]);
    hi = _pdep_u64(x >> (8 * B), kPdepMask[B]);
  } else if constexpr (B < 8) {
    lo = _pdep_u64(load_bytes<B>(p), kPdepMask[B]);
    hi = _pdep_u64(load_bytes<B>(p + B), kPdepMask[B]);
  } else {
    lo = load_bytes<8>(p);
    hi = load_bytes<8>(p + 8);
  }
  return _mm512_cvtepu8_epi32(_mm_set_epi64x(static_cast<long long>(hi), static_cast<long long>(lo)));
}

// bits <= 4: the chunk's 2B bytes broadcast to every 128-bit lane; vpshufb
// puts bytes (Bk/8, Bk/8 + 1) into dword k, vpsrlvd shifts by Bk % 8, and
// vpermps looks the low 4 bits up in a table replicated so that the bits
// above B (left-overs of the next code) do not matter: T[i] = c[i & (2^B - 1)].
template <int B>
inline __m512i broadcast_chunk(const uint8_t* rec, int c) {
  const uint8_t* p = rec + size_t(2 * B) * c;
  if constexpr (B == 1) return _mm512_set1_epi16(static_cast<short>(load_le<2>(p)));
  else if constexpr (B == 2) return _mm512_set1_epi32(static_cast<int>(load_le<4>(p)));
  else return _mm512_set1_epi64(static_cast<long long>(load_bytes<2 * B>(p)));
}

// vpmultishiftqb (AVX512_VBMI) through inline assembly: the file is built
// without -mavx512vbmi, and this path only runs once the CPU check found VBMI.
inline __m512i multishift(__m512i ctrl, __m512i data) {
  __m512i r;
  __asm__("vpmultishiftqb %2, %1, %0" : "=v"(r) : "v"(ctrl), "v"(data));
  return r;
}

// Ms (bits <= 4, VBMI): one vpmultishiftqb moves bits [Bk, Bk + 8) of the
// broadcast chunk into the low byte of dword k, replacing vpshufb + vpsrlvd
// (the bits above B are don't-cares for the replicated table). bits = 3 reads
// the chunk with one 8-byte broadcast load, 2 bytes past its 6: still inside
// the record (the scale follows the codes).
template <int B, bool Ms = false>
struct CodeDec {
  static constexpr bool kScaled = true;
  static constexpr int kStep = 1;
  static_assert(!Ms || B <= 4);
  __m512 t0, t1;
  __m512i shuf, shift;
  const float* cent;
  size_t scale_off;
  bool scale_f32;
  CodeDec(const float* c, size_t so, bool sf) : cent(c), scale_off(so), scale_f32(sf) {
    alignas(64) int8_t sb[64];
    alignas(64) int32_t sh[16];
    for (int k = 0; k < 16; ++k) {
      const int b0 = (B * k) / 8;
      if constexpr (Ms) {
        sb[4 * k] = static_cast<int8_t>(B * k);
        sb[4 * k + 1] = sb[4 * k + 2] = sb[4 * k + 3] = 0;
      } else {
        sb[4 * k] = static_cast<int8_t>(b0);
        sb[4 * k + 1] = static_cast<int8_t>(b0 + 1 < 16 ? b0 + 1 : -128);
        sb[4 * k + 2] = sb[4 * k + 3] = -128;
      }
      sh[k] = (B * k) % 8;
    }
    shuf = _mm512_load_si512(sb);
    shift = _mm512_load_si512(sh);
    if constexpr (B <= 4) {
      alignas(64) float t[16];
      for (int i = 0; i < 16; ++i) t[i] = c[i & ((1 << B) - 1)];
      t0 = t1 = _mm512_load_ps(t);
    } else if constexpr (B == 5) {
      t0 = _mm512_loadu_ps(c);
      t1 = _mm512_loadu_ps(c + 16);
    } else {
      t0 = t1 = _mm512_setzero_ps();
    }
  }
  __m512 load(const uint8_t* rec, int c) const {
    if constexpr (Ms) {
      __m512i x;
      if constexpr (B == 3) x = _mm512_set1_epi64(static_cast<long long>(load_le<8>(rec + 6 * size_t(c))));
      else x = broadcast_chunk<B>(rec, c);
      return _mm512_permutexvar_ps(multishift(shuf, x), t0);
    } else if constexpr (B <= 4) {
      const __m512i idx =
          _mm512_srlv_epi32(_mm512_shuffle_epi8(broadcast_chunk<B>(rec, c), shuf), shift);
      return _mm512_permutexvar_ps(idx, t0);
    } else {
      const __m512i idx = codes16<B>(rec, c);
      if constexpr (B == 5) return _mm512_permutex2var_ps(t0, idx, t1);
      else return _mm512_i32gather_ps(idx, cent, 4);
    }
  }
  float scale(const uint8_t* rec) const { return load_scale(rec + scale_off, scale_f32); }
};

// 4-bit codes, two chunks (32 codes, 16 bytes) per step: vpmovzxbd puts
// byte k (codes 2k, 2k+1) in dword k; vpermps reads only the low 4 bits of
// each index, so the byte itself looks up the even code and the byte >> 4 the
// odd one -- 2 shuffle-port ops per 16 codes plus a shift per 32, no
// broadcast. The price is the coordinate order: a step yields coordinates
// [32s, 32s+2, ..., 32s+30] then [32s+1, ..., 32s+31], so the caller hands
// in queries and accumulators permuted that way (permute_pairs below).
struct Nib4Dec {
  static constexpr bool kScaled = true;
  static constexpr int kStep = 2;
  __m512 t0;
  size_t scale_off;
  bool scale_f32;
  Nib4Dec(const float* c, size_t so, bool sf) : t0(_mm512_loadu_ps(c)), scale_off(so), scale_f32(sf) {}
  void load_step(const uint8_t* rec, int c, __m512* x) const {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 8 * size_t(c))));
    x[0] = _mm512_permutexvar_ps(b, t0);
    x[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t0);
  }
  float scale(const uint8_t* rec) const { return load_scale(rec + scale_off, scale_f32); }
};

// [32 natural] <-> [16 even | 16 odd] per 32 floats; rows of d (d % 32 == 0).
inline void permute_pairs(const float* in, int rows, int d, float* out) {
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_add_epi32(ie, _mm512_set1_epi32(1));
  for (size_t i = 0; i < size_t(rows) * d; i += 32) {
    const __m512 lo = _mm512_loadu_ps(in + i), hi = _mm512_loadu_ps(in + i + 16);
    _mm512_storeu_ps(out + i, _mm512_permutex2var_ps(lo, ie, hi));
    _mm512_storeu_ps(out + i + 16, _mm512_permutex2var_ps(lo, io, hi));
  }
}
inline void unpermute_pairs(const float* in, int rows, int d, float* out) {
  const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ih = _mm512_add_epi32(il, _mm512_set1_epi32(8));
  for (size_t i = 0; i < size_t(rows) * d; i += 32) {
    const __m512 e = _mm512_loadu_ps(in + i), o = _mm512_loadu_ps(in + i + 16);
    _mm512_storeu_ps(out + i, _mm512_permutex2var_ps(e, il, o));
    _mm512_storeu_ps(out + i + 16, _mm512_permutex2var_ps(e, ih, o));
  }
}

// q8_0 (Q8) / q4_0 blocks, one block (two chunks) per step, natural order:
// q8_0 sign-extends 16 int8 to dwords and converts; q4_0 widens the 16 bytes
// once and looks both nibbles up in the table (i - 8) with vpermps (low 4 bits
// of the index only). Each chunk is multiplied by the block's fp16 scale.
template <bool Q8>
struct BlockDec {
  static constexpr bool kScaled = false;
  static constexpr int kStep = 2;
  static constexpr size_t kBytes = Q8 ? 34 : 18;
  __m512 tab = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  void load_step(const uint8_t* rec, int c, __m512* x) const {
    const uint8_t* blk = rec + kBytes * size_t(c / 2);
    uint16_t h;
    std::memcpy(&h, blk, sizeof h);
    const __m512 sc = _mm512_set1_ps(_cvtsh_ss(h));
    if constexpr (Q8) {
      for (int t = 0; t < 2; ++t) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2 + 16 * t));
        x[t] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), sc);
      }
    } else {
      const __m512i b =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
      x[0] = _mm512_mul_ps(_mm512_permutexvar_ps(b, tab), sc);
      x[1] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab), sc);
    }
  }
  float scale(const uint8_t*) const { return 1.0f; }
};

// Sign bits -> +-1: 16 bits of the sketch as a mask, one blend per chunk;
// the record's weight factor * norm is the "scale".
struct SignDec {
  static constexpr bool kScaled = true;
  static constexpr int kStep = 1;
  size_t sign_off, norm_off;
  float factor;
  bool norm_f32;
  __m512 load(const uint8_t* rec, int c) const {
    uint16_t bits;
    std::memcpy(&bits, rec + sign_off + 2 * size_t(c), sizeof bits);
    return _mm512_mask_blend_ps(bits, _mm512_set1_ps(-1.0f), _mm512_set1_ps(1.0f));
  }
  float scale(const uint8_t* rec) const { return factor * load_scale(rec + norm_off, norm_f32); }
};

template <class Dec>
inline void load_step(const Dec& dec, const uint8_t* rec, int c, __m512* x) {
  if constexpr (Dec::kStep == 1) x[0] = dec.load(rec, c);
  else dec.load_step(rec, c, x);
}

template <int K>
struct DenseDec {
  static constexpr bool kScaled = false;
  static constexpr int kStep = 1;
  __m512 load(const uint8_t* rec, int c) const {
    if constexpr (K == 0) {
      return _mm512_loadu_ps(reinterpret_cast<const float*>(rec + 64 * size_t(c)));
    } else {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 32 * size_t(c)));
      if constexpr (K == 1) return _mm512_cvtph_ps(h);
      else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
  float scale(const uint8_t*) const { return 1.0f; }
};

// The 16 horizontal sums of a[0..15] in one vector: lane i holds the sum of
// a[4 * (i % 4) + i / 4]. A transposing tree of 30 in-lane/128-bit shuffles
// and 15 adds (two hadd trees of 8 cost ~70 shuffle-port ops).
inline __m512 reduce16(const __m512* a) {
  __m512 t[8], v[4], z[2];
  for (int k = 0; k < 8; ++k)
    t[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)
    v[k] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)
    z[k] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * k], v[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(v[2 * k], v[2 * k + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}

// G heads x R records (G * R == 16) per batch: 16 zmm accumulators, the q
// chunks loaded once per chunk and shared by R records, one reduce16 per batch.
template <class Dec, int G, int R>
void score_impl(const Dec& dec, const float* q, int d, const uint8_t* recs, size_t stride, size_t n,
                float* scores) {
  static_assert(G * R == 16);
  const int nc = d / 16;
  for (size_t j0 = 0; j0 < n; j0 += R) {
    const uint8_t* rp[R];
    for (int r = 0; r < R; ++r) rp[r] = recs + (j0 + r < n ? j0 + r : n - 1) * stride;
    __m512 acc[16];
    for (int k = 0; k < 16; ++k) acc[k] = _mm512_setzero_ps();
    constexpr int S = Dec::kStep;
    for (int c = 0; c < nc; c += S) {
      __m512 qv[S][G];
      for (int t = 0; t < S; ++t)
        for (int h = 0; h < G; ++h) qv[t][h] = _mm512_loadu_ps(q + size_t(h) * d + 16 * (c + t));
      for (int r = 0; r < R; ++r) {
        __m512 x[S];
        load_step(dec, rp[r], c, x);
        for (int t = 0; t < S; ++t)
          for (int h = 0; h < G; ++h) acc[r * G + h] = _mm512_fmadd_ps(qv[t][h], x[t], acc[r * G + h]);
      }
    }
    alignas(64) float s[16];
    _mm512_store_ps(s, reduce16(acc));
    for (int r = 0; r < R; ++r) {
      if (j0 + r >= n) break;
      const float sc = Dec::kScaled ? dec.scale(rp[r]) : 1.0f;
      for (int h = 0; h < G; ++h) {
        const int k = r * G + h;
        scores[h * n + j0 + r] = s[4 * (k % 4) + k / 4] * sc;
      }
    }
  }
}

// Largest head_dim whose query rows are first copied to a 64-byte aligned
// stack buffer (also the limit of the paired 4-bit path): the q chunks are
// re-read for every batch of records, and unaligned zmm loads split across
// cache lines.
constexpr int kMaxAlignedD = 512;

template <class Dec>
void score_any(const Dec& dec, const float* q, int g, int d, const uint8_t* recs, size_t stride,
               size_t n, float* scores) {
  alignas(64) float qa[8 * kMaxAlignedD];
  for (int h = 0; h < g;) {
    const int left = g - h;
    const float* qh = q + size_t(h) * d;
    if (d <= kMaxAlignedD && (reinterpret_cast<uintptr_t>(qh) & 63) != 0) {
      const int rows = left < 8 ? left : 8;
      std::memcpy(qa, qh, sizeof(float) * size_t(rows) * d);
      qh = qa;
    }
    float* sh = scores + size_t(h) * n;
    if (left >= 8 && Dec::kStep == 1) {  // (a step of 2 would need 16 q registers)
      score_impl<Dec, 8, 2>(dec, qh, d, recs, stride, n, sh);
      h += 8;
    } else if (left >= 4) {
      score_impl<Dec, 4, 4>(dec, qh, d, recs, stride, n, sh);
      h += 4;
    } else if (left >= 2) {
      score_impl<Dec, 2, 8>(dec, qh, d, recs, stride, n, sh);
      h += 2;
    } else {
      score_impl<Dec, 1, 16>(dec, qh, d, recs, stride, n, sh);
      h += 1;
    }
  }
}

constexpr int kBlock = 32;

// Output chunks c0 .. c0+C-1 of G heads over one block of records.
template <class Dec, int G, int C>
inline void acc_block(const Dec& dec, const float* ws, int bl, const uint8_t* rec0, size_t stride,
                      int d, int c0, float* acc) {
  __m512 a[G * C];
  for (int h = 0; h < G; ++h)
    for (int cc = 0; cc < C; ++cc)
      a[h * C + cc] = _mm512_loadu_ps(acc + size_t(h) * d + 16 * (c0 + cc));
  const uint8_t* rec = rec0;
  for (int jj = 0; jj < bl; ++jj, rec += stride) {
    __m512 x[C];
    for (int cc = 0; cc < C; cc += Dec::kStep) load_step(dec, rec, c0 + cc, x + cc);
    for (int h = 0; h < G; ++h) {
      const __m512 wv = _mm512_set1_ps(ws[jj * G + h]);
      for (int cc = 0; cc < C; ++cc) a[h * C + cc] = _mm512_fmadd_ps(wv, x[cc], a[h * C + cc]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int cc = 0; cc < C; ++cc)
      _mm512_storeu_ps(acc + size_t(h) * d + 16 * (c0 + cc), a[h * C + cc]);
}

template <class Dec, int G>
void accumulate_impl(const Dec& dec, const float* w, size_t wstride, int d, const uint8_t* recs,
                     size_t stride, size_t n, float* acc) {
  constexpr int C = G >= 2 ? 16 / G : 8;  // G x C <= 16 zmm of output in registers
  const int nc = d / 16;
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
    for (; c0 < nc; c0 += Dec::kStep) acc_block<Dec, G, Dec::kStep>(dec, ws, bl, rec0, stride, d, c0, acc);
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

constexpr int kMaxPairD = kMaxAlignedD;

template <bool Vbmi>
void score_codes_avx512(const float* q, int g, int d, const uint8_t* recs, size_t stride, size_t n,
                        int bits, const float* centroids, size_t scale_off, bool scale_f32,
                        float* scores) {
  if (d % 16 != 0 || n == 0 || bits < 1 || bits > 8) {
    attn_kernels_ref().score_codes(q, g, d, recs, stride, n, bits, centroids, scale_off, scale_f32,
                                   scores);
    return;
  }
  if (bits == 4 && d % 32 == 0 && d <= kMaxPairD) {
    alignas(64) float qperm[8 * kMaxPairD];
    const Nib4Dec dec(centroids, scale_off, scale_f32);
    for (int h0 = 0; h0 < g; h0 += 8) {
      const int gg = g - h0 < 8 ? g - h0 : 8;
      permute_pairs(q + size_t(h0) * d, gg, d, qperm);
      score_any(dec, qperm, gg, d, recs, stride, n, scores + size_t(h0) * n);
    }
    return;
  }
  switch (bits) {
#define TQ_CASE(B)                                                                        \
  case B:                                                                                 \
    score_any(CodeDec<B, Vbmi && B <= 4>(centroids, scale_off, scale_f32), q, g, d, recs, stride, n, scores); \
    return;
    TQ_CASE(1) TQ_CASE(2) TQ_CASE(3) TQ_CASE(4) TQ_CASE(5) TQ_CASE(6) TQ_CASE(7) TQ_CASE(8)
#undef TQ_CASE
  }
}

template <bool Vbmi>
void accumulate_codes_avx512(const float* w, int g, int d, const uint8_t* recs, size_t stride,
                             size_t n, int bits, const float* centroids, size_t scale_off,
                             bool scale_f32, float* acc) {
  if (d % 16 != 0 || n == 0 || bits < 1 || bits > 8) {
    attn_kernels_ref().accumulate_codes(w, g, d, recs, stride, n, bits, centroids, scale_off,
                                        scale_f32, acc);
    return;
  }
  if (bits == 4 && d % 32 == 0 && d <= kMaxPairD) {
    alignas(64) float aperm[8 * kMaxPairD];
    const Nib4Dec dec(centroids, scale_off, scale_f32);
    for (int h0 = 0; h0 < g; h0 += 8) {
      const int gg = g - h0 < 8 ? g - h0 : 8;
      float* ah = acc + size_t(h0) * d;
      permute_pairs(ah, gg, d, aperm);
      accumulate_any(dec, w + size_t(h0) * n, gg, d, recs, stride, n, aperm);
      unpermute_pairs(aperm, gg, d, ah);
    }
    return;
  }
  switch (bits) {
#define TQ_CASE(B)                                                                              \
  case B:                                                                                       \
    accumulate_any(CodeDec<B, Vbmi && B <= 4>(centroids, scale_off, scale_f32), w, g, d, recs, stride, n, acc); \
    return;
    TQ_CASE(1) TQ_CASE(2) TQ_CASE(3) TQ_CASE(4) TQ_CASE(5) TQ_CASE(6) TQ_CASE(7) TQ_CASE(8)
#undef TQ_CASE
  }
}

void score_dense_avx512(int kind, const float* q, int g, int d, const uint8_t* recs, size_t stride,
                        size_t n, float* scores) {
  if (d % 16 != 0 || n == 0 || kind < 0 || kind > 2) {
    attn_kernels_ref().score_dense(kind, q, g, d, recs, stride, n, scores);
    return;
  }
  switch (kind) {
    case 0: score_any(DenseDec<0>{}, q, g, d, recs, stride, n, scores); return;
    case 1: score_any(DenseDec<1>{}, q, g, d, recs, stride, n, scores); return;
    default: score_any(DenseDec<2>{}, q, g, d, recs, stride, n, scores); return;
  }
}

void accumulate_dense_avx512(int kind, const float* w, int g, int d, const uint8_t* recs,
                             size_t stride, size_t n, float* acc) {
  if (d % 16 != 0 || n == 0 || kind < 0 || kind > 2) {
    attn_kernels_ref().accumulate_dense(kind, w, g, d, recs, stride, n, acc);
    return;
  }
  switch (kind) {
    case 0: accumulate_any(DenseDec<0>{}, w, g, d, recs, stride, n, acc); return;
    case 1: accumulate_any(DenseDec<1>{}, w, g, d, recs, stride, n, acc); return;
    default: accumulate_any(DenseDec<2>{}, w, g, d, recs, stride, n, acc); return;
  }
}

void score_blocks_avx512(int kind, const float* q, int g, int d, const uint8_t* recs,
                         size_t stride, size_t n, float* scores) {
  if (d % 32 != 0 || n == 0 || kind < 0 || kind > 1) {
    attn_kernels_ref().score_blocks(kind, q, g, d, recs, stride, n, scores);
    return;
  }
  if (kind == 0) score_any(BlockDec<true>{}, q, g, d, recs, stride, n, scores);
  else score_any(BlockDec<false>{}, q, g, d, recs, stride, n, scores);
}

void accumulate_blocks_avx512(int kind, const float* w, int g, int d, const uint8_t* recs,
                              size_t stride, size_t n, float* acc) {
  if (d % 32 != 0 || n == 0 || kind < 0 || kind > 1) {
    attn_kernels_ref().accumulate_blocks(kind, w, g, d, recs, stride, n, acc);
    return;
  }
  if (kind == 0) accumulate_any(BlockDec<true>{}, w, g, d, recs, stride, n, acc);
  else accumulate_any(BlockDec<false>{}, w, g, d, recs, stride, n, acc);
}

void score_signs_avx512(const float* q, int g, int m, const uint8_t* recs, size_t stride, size_t n,
                        size_t sign_off, float factor, size_t norm_off, bool norm_f32,
                        float* scores) {
  if (m % 16 != 0 || n == 0) {
    attn_kernels_ref().score_signs(q, g, m, recs, stride, n, sign_off, factor, norm_off, norm_f32,
                                   scores);
    return;
  }
  score_any(SignDec{sign_off, norm_off, factor, norm_f32}, q, g, m, recs, stride, n, scores);
}

void accumulate_signs_avx512(const float* w, int g, int m, const uint8_t* recs, size_t stride,
                             size_t n, size_t sign_off, float factor, size_t norm_off,
                             bool norm_f32, float* acc) {
  if (m % 16 != 0 || n == 0) {
    attn_kernels_ref().accumulate_signs(w, g, m, recs, stride, n, sign_off, factor, norm_off,
                                        norm_f32, acc);
    return;
  }
  accumulate_any(SignDec{sign_off, norm_off, factor, norm_f32}, w, g, m, recs, stride, n, acc);
}

// exp(x) for x <= 0: x = i ln2 + r with i = round(x / ln2), |r| <= ln2 / 2
// (Cody-Waite split of ln2, so r is exact to ~1 ulp), a degree-7 Taylor
// polynomial for e^r (truncation < 5e-9 relative) and vscalefps for 2^i,
// which underflows gracefully to 0. x is clamped at -104 so -inf gives 0, not NaN.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 i = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(i, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(i, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, i);
}

void softmax_chunk_avx512(float* s, int g, size_t n, float scale, float* m, float* l,
                          float* corr) {
  const __m512 vs = _mm512_set1_ps(scale);
  const size_t n16 = n & ~size_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - n16)) - 1);
  for (int h = 0; h < g; ++h) {
    float* sh = s + size_t(h) * n;
    __m512 mx = _mm512_set1_ps(-__builtin_inff());
    size_t j = 0;
    for (; j < n16; j += 16) mx = _mm512_max_ps(mx, _mm512_mul_ps(_mm512_loadu_ps(sh + j), vs));
    if (tail)
      mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, sh + j), vs));
    const float m_old = m[h];
    float m_new = _mm512_reduce_max_ps(mx);
    m_new = m_new > m_old ? m_new : m_old;
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j < n16; j += 16) {
      const __m512 w = exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(sh + j), vs, vm));
      _mm512_storeu_ps(sh + j, w);
      sum = _mm512_add_ps(sum, w);
    }
    if (tail) {
      const __m512 w = exp_nonpositive(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, sh + j), vs, vm));
      _mm512_mask_storeu_ps(sh + j, tail, w);
      sum = _mm512_mask_add_ps(sum, tail, sum, w);
    }
    const float c = m_old == m_new ? 1.0f
                    : m_old == -__builtin_inff()
                        ? 0.0f
                        : _mm512_cvtss_f32(exp_nonpositive(_mm512_set1_ps(m_old - m_new)));
    corr[h] = c;
    l[h] = l[h] * c + _mm512_reduce_add_ps(sum);
    m[h] = m_new;
  }
}

// PolarQuant decode, one record at a time, 16 angles of a level per step:
// their codes from one masked load of <= 8 bytes (bits <= 4: 16 codes fit in
// 64 bits), spread to dword lanes by two variable 64-bit shifts (even and odd
// codes) and a blend, cos and sin by vpermps on one-zmm tables, the two
// products, then interleaved into (r cos, r sin) pairs. Masks cover levels of
// fewer than 16 angles, so nothing past a record's bytes is read. Other
// widths (bits > 4) and dims above 1024 take the reference.
constexpr int kPolarMaxDim = 1024;

void decode_polar_avx512(const PolarLayout& L, const uint8_t* recs, size_t stride, size_t n,
                         float* out) {
  const int d = L.dim;
  bool simd = d <= kPolarMaxDim;
  for (int l = 0; l < L.levels; ++l) simd = simd && L.bits[l] <= 4;
  if (!simd) return attn_kernels_ref().decode_polar(L, recs, stride, n, out);
  __m512 cos_t[kMaxPolarLevels], sin_t[kMaxPolarLevels];
  __m512i shift_even[kMaxPolarLevels], shift_odd[kMaxPolarLevels], code_mask[kMaxPolarLevels];
  for (int l = 0; l < L.levels; ++l) {
    const int b = L.bits[l];
    const __mmask16 tk = static_cast<__mmask16>((1u << (1 << b)) - 1);
    cos_t[l] = _mm512_maskz_loadu_ps(tk, L.cos[l]);
    sin_t[l] = _mm512_maskz_loadu_ps(tk, L.sin[l]);
    shift_even[l] = _mm512_set_epi64(14 * b, 12 * b, 10 * b, 8 * b, 6 * b, 4 * b, 2 * b, 0);
    shift_odd[l] = _mm512_set_epi64(15 * b, 13 * b, 11 * b, 9 * b, 7 * b, 5 * b, 3 * b, b);
    code_mask[l] = _mm512_set1_epi32((1 << b) - 1);
  }
  const __m512i pair_lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i pair_hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  // Levels hand their values over through these buffers with whole-zmm stores
  // and loads at the same 64-byte offsets, so each load is forwarded from its
  // store (a masked store or load there costs a store-forwarding stall per
  // level on Zen 4); lanes past a level's end hold junk that no lane reads.
  alignas(64) float buf_a[kPolarMaxDim / 2 + 32], buf_b[kPolarMaxDim / 2 + 32];
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* rec = recs + j * stride;
    float* cur = buf_a;
    float* nxt = buf_b;
    const int n_radii = d >> L.levels;
    for (int i0 = 0; i0 < n_radii; i0 += 16) {
      const int cnt = n_radii - i0 < 16 ? n_radii - i0 : 16;
      const __mmask16 km = static_cast<__mmask16>((1u << cnt) - 1);
      const __m256i h = _mm256_maskz_loadu_epi16(km, rec + L.radii_offset + 2 * size_t(i0));
      _mm512_store_ps(cur + i0, _mm512_cvtph_ps(h));
    }
    for (int l = L.levels; l >= 1; --l) {
      const int m = d >> l, b = L.bits[l - 1], li = l - 1;
      const uint8_t* codes = rec + L.level_offset[li];
      float* o = l == 1 ? out + j * size_t(d) : nxt;
      for (int i0 = 0; i0 < m; i0 += 16) {
        const int cnt = m - i0 < 16 ? m - i0 : 16;
        const int n_bytes = (cnt * b + 7) / 8;  // <= 8; i0 * b is a multiple of 16 bits
        const __m128i raw = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n_bytes) - 1),
                                                 codes + size_t(i0) * b / 8);
        const __m512i w = _mm512_broadcastq_epi64(raw);
        const __m512i even = _mm512_srlv_epi64(w, shift_even[li]);
        const __m512i odd = _mm512_slli_epi64(_mm512_srlv_epi64(w, shift_odd[li]), 32);
        const __m512i idx = _mm512_and_si512(_mm512_mask_blend_epi32(0xAAAA, even, odd), code_mask[li]);
        const __m512 r = _mm512_load_ps(cur + i0);
        const __m512 rc = _mm512_mul_ps(r, _mm512_permutexvar_ps(idx, cos_t[li]));
        const __m512 rs = _mm512_mul_ps(r, _mm512_permutexvar_ps(idx, sin_t[li]));
        const __m512 lo = _mm512_permutex2var_ps(rc, pair_lo, rs);
        const __m512 hi = _mm512_permutex2var_ps(rc, pair_hi, rs);
        if (cnt == 16 || l > 1) {  // an intermediate level may write junk past its end
          _mm512_storeu_ps(o + 2 * i0, lo);
          _mm512_storeu_ps(o + 2 * i0 + 16, hi);
        } else {  // the output's last 2 cnt < 32 values
          const int k = 2 * cnt;
          _mm512_mask_storeu_ps(o + 2 * i0, static_cast<__mmask16>(k >= 16 ? 0xFFFFu : (1u << k) - 1), lo);
          if (k > 16) _mm512_mask_storeu_ps(o + 2 * i0 + 16, static_cast<__mmask16>((1u << (k - 16)) - 1), hi);
        }
      }
      float* t = cur;
      cur = nxt;
      nxt = t;
    }
  }
}

// Constant-initialised: no code from this file runs before the CPU check.
constexpr AttnKernels kAttnAvx512{SimdLevel::avx512,             score_codes_avx512<false>,
                                  accumulate_codes_avx512<false>, score_dense_avx512,
                                  accumulate_dense_avx512,        score_blocks_avx512,
                                  accumulate_blocks_avx512,       score_signs_avx512,
                                  accumulate_signs_avx512,        softmax_chunk_avx512,
                                  decode_polar_avx512};
// The same with the VBMI code decoder (bits <= 4), picked when the CPU has it.
constexpr AttnKernels kAttnAvx512Vbmi{SimdLevel::avx512,            score_codes_avx512<true>,
                                      accumulate_codes_avx512<true>, score_dense_avx512,
                                      accumulate_dense_avx512,       score_blocks_avx512,
                                      accumulate_blocks_avx512,      score_signs_avx512,
                                      accumulate_signs_avx512,       softmax_chunk_avx512,
                                      decode_polar_avx512};

}  // namespace

__attribute__((target("arch=x86-64"))) const AttnKernels* attn_kernels_avx512() {
  static const bool ok = cpu_supports(SimdLevel::avx512);
  static const bool vbmi = ok && __builtin_cpu_supports("avx512vbmi");
  return ok ? (vbmi ? &kAttnAvx512Vbmi : &kAttnAvx512) : nullptr;
}

__attribute__((target("arch=x86-64"))) const AttnKernels* attn_kernels_avx512_no_vbmi() {
  static const bool ok = cpu_supports(SimdLevel::avx512);
  return ok ? &kAttnAvx512 : nullptr;
}

}  // namespace tq::kernels
