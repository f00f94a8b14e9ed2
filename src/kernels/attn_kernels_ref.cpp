// Scalar reference for the attention-on-records kernels (attn_kernels.hpp),
// plus the run-time table choice.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "kernels/attn_kernels.hpp"
#include "turboquant/error.hpp"
#include "turboquant/half.hpp"

namespace tq::kernels {
namespace {

inline unsigned code_at(const uint8_t* in, int i, int bits) {
  const size_t bit = size_t(i) * bits;
  unsigned v = in[bit / 8];
  if ((bit % 8) + bits > 8) v |= static_cast<unsigned>(in[bit / 8 + 1]) << 8;
  return (v >> (bit % 8)) & ((1u << bits) - 1);
}

inline float scale_at(const uint8_t* p, bool f32) {
  if (f32) {
    float s;
    std::memcpy(&s, p, sizeof s);
    return s;
  }
  return half_to_float(static_cast<uint16_t>(p[0] | p[1] << 8));
}

inline float dense_at(int kind, const uint8_t* rec, int i) {
  switch (kind) {
    case 0: {
      float v;
      std::memcpy(&v, rec + 4 * size_t(i), sizeof v);
      return v;
    }
    case 1: return half_to_float(static_cast<uint16_t>(rec[2 * i] | rec[2 * i + 1] << 8));
    default: return bf16_to_float(static_cast<uint16_t>(rec[2 * i] | rec[2 * i + 1] << 8));
  }
}

void score_codes_ref(const float* q, int g, int d, const uint8_t* recs, size_t stride, size_t n,
                     int bits, const float* centroids, size_t scale_off, bool scale_f32,
                     float* scores) {
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* rec = recs + j * stride;
    const float sc = scale_at(rec + scale_off, scale_f32);
    for (int h = 0; h < g; ++h) {
      const float* qh = q + size_t(h) * d;
      float s = 0.0f;
      for (int i = 0; i < d; ++i) s += qh[i] * centroids[code_at(rec, i, bits)];
      scores[h * n + j] = sc * s;
    }
  }
}

void accumulate_codes_ref(const float* w, int g, int d, const uint8_t* recs, size_t stride,
                          size_t n, int bits, const float* centroids, size_t scale_off,
                          bool scale_f32, float* acc) {
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* rec = recs + j * stride;
    const float sc = scale_at(rec + scale_off, scale_f32);
    for (int h = 0; h < g; ++h) {
      const float wj = w[h * n + j] * sc;
      float* a = acc + size_t(h) * d;
      for (int i = 0; i < d; ++i) a[i] += wj * centroids[code_at(rec, i, bits)];
    }
  }
}

void score_dense_ref(int kind, const float* q, int g, int d, const uint8_t* recs, size_t stride,
                     size_t n, float* scores) {
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* rec = recs + j * stride;
    for (int h = 0; h < g; ++h) {
      const float* qh = q + size_t(h) * d;
      float s = 0.0f;
      for (int i = 0; i < d; ++i) s += qh[i] * dense_at(kind, rec, i);
      scores[h * n + j] = s;
    }
  }
}

void accumulate_dense_ref(int kind, const float* w, int g, int d, const uint8_t* recs,
                          size_t stride, size_t n, float* acc) {
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* rec = recs + j * stride;
    for (int h = 0; h < g; ++h) {
      const float wj = w[h * n + j];
      float* a = acc + size_t(h) * d;
      for (int i = 0; i < d; ++i) a[i] += wj * dense_at(kind, rec, i);
    }
  }
}

// Element i of a record of q8_0 (kind 0) / q4_0 (kind 1) blocks.
inline float block_at(int kind, const uint8_t* rec, int i) {
  const int b = i / 32, k = i % 32;
  const uint8_t* blk = rec + size_t(b) * (kind == 0 ? 34 : 18);
  const float sc = half_to_float(static_cast<uint16_t>(blk[0] | blk[1] << 8));
  if (kind == 0) return static_cast<float>(static_cast<int8_t>(blk[2 + k])) * sc;
  const int nib = k < 16 ? (blk[2 + k] & 0x0f) : (blk[2 + k - 16] >> 4);
  return static_cast<float>(nib - 8) * sc;
}

void score_blocks_ref(int kind, const float* q, int g, int d, const uint8_t* recs, size_t stride,
                      size_t n, float* scores) {
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* rec = recs + j * stride;
    for (int h = 0; h < g; ++h) {
      const float* qh = q + size_t(h) * d;
      float s = 0.0f;
      for (int i = 0; i < d; ++i) s += qh[i] * block_at(kind, rec, i);
      scores[h * n + j] = s;
    }
  }
}

void accumulate_blocks_ref(int kind, const float* w, int g, int d, const uint8_t* recs,
                           size_t stride, size_t n, float* acc) {
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* rec = recs + j * stride;
    for (int h = 0; h < g; ++h) {
      const float wj = w[h * n + j];
      float* a = acc + size_t(h) * d;
      for (int i = 0; i < d; ++i) a[i] += wj * block_at(kind, rec, i);
    }
  }
}

inline float sign_at(const uint8_t* signs, int i) { return (signs[i / 8] >> (i % 8)) & 1 ? 1.0f : -1.0f; }

void score_signs_ref(const float* q, int g, int m, const uint8_t* recs, size_t stride, size_t n,
                     size_t sign_off, float factor, size_t norm_off, bool norm_f32,
                     float* scores) {
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* rec = recs + j * stride;
    const float f = factor * scale_at(rec + norm_off, norm_f32);
    for (int h = 0; h < g; ++h) {
      const float* qh = q + size_t(h) * m;
      float s = 0.0f;
      for (int i = 0; i < m; ++i) s += qh[i] * sign_at(rec + sign_off, i);
      scores[h * n + j] = f * s;
    }
  }
}

void accumulate_signs_ref(const float* w, int g, int m, const uint8_t* recs, size_t stride,
                          size_t n, size_t sign_off, float factor, size_t norm_off, bool norm_f32,
                          float* acc) {
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* rec = recs + j * stride;
    const float f = factor * scale_at(rec + norm_off, norm_f32);
    for (int h = 0; h < g; ++h) {
      const float wj = w[h * n + j] * f;
      float* a = acc + size_t(h) * m;
      for (int i = 0; i < m; ++i) a[i] += wj * sign_at(rec + sign_off, i);
    }
  }
}

void softmax_chunk_ref(float* s, int g, size_t n, float scale, float* m, float* l, float* corr) {
  for (int h = 0; h < g; ++h) {
    float* sh = s + size_t(h) * n;
    float mx = -INFINITY;
    for (size_t j = 0; j < n; ++j) mx = std::max(mx, sh[j] * scale);
    const float m_new = std::max(m[h], mx);
    corr[h] = m[h] == -INFINITY ? 0.0f : std::exp(m[h] - m_new);
    float sum = 0.0f;
    for (size_t j = 0; j < n; ++j) sum += sh[j] = std::exp(sh[j] * scale - m_new);
    l[h] = l[h] * corr[h] + sum;
    m[h] = m_new;
  }
}

void decode_polar_ref(const PolarLayout& L, const uint8_t* recs, size_t stride, size_t n, float* out) {
  const int d = L.dim;
  // Each level's values (at most d / 2 before level 1): on the stack for the
  // usual dims, so that decoding one record allocates nothing.
  constexpr int kStack = 512;
  float sa[kStack], sb[kStack];
  std::vector<float> va, vb;
  if (d / 2 > kStack) {
    va.resize(size_t(d) / 2);
    vb.resize(size_t(d) / 2);
  }
  for (size_t j = 0; j < n; ++j) {
    const uint8_t* rec = recs + j * stride;
    float* cur = d / 2 > kStack ? va.data() : sa;
    float* nxt = d / 2 > kStack ? vb.data() : sb;
    for (int i = 0; i < d >> L.levels; ++i)
      cur[i] = half_to_float(static_cast<uint16_t>(rec[L.radii_offset + 2 * i] |
                                                   rec[L.radii_offset + 2 * i + 1] << 8));
    for (int l = L.levels; l >= 1; --l) {
      const uint8_t* codes = rec + L.level_offset[l - 1];
      const float* cs = L.cos[l - 1];
      const float* sn = L.sin[l - 1];
      float* o = l == 1 ? out + j * size_t(d) : nxt;
      for (int i = 0; i < d >> l; ++i) {
        const unsigned c = code_at(codes, i, L.bits[l - 1]);
        o[2 * i] = cur[i] * cs[c];
        o[2 * i + 1] = cur[i] * sn[c];
      }
      std::swap(cur, nxt);
    }
  }
}

}  // namespace

const AttnKernels& attn_kernels_ref() {
  static const AttnKernels k{SimdLevel::scalar, score_codes_ref, accumulate_codes_ref,
                             score_dense_ref, accumulate_dense_ref, score_blocks_ref,
                             accumulate_blocks_ref,  score_signs_ref,
                             accumulate_signs_ref,   softmax_chunk_ref, decode_polar_ref};
  return k;
}

#ifndef TQ_X86_SIMD
const AttnKernels* attn_kernels_avx2() { return nullptr; }
const AttnKernels* attn_kernels_avx512() { return nullptr; }
const AttnKernels* attn_kernels_avx512_no_vbmi() { return nullptr; }
#endif

const AttnKernels& attn_kernels_for(SimdLevel level) {
  switch (level) {
    case SimdLevel::scalar: return attn_kernels_ref();
    case SimdLevel::avx2:
      if (auto* k = attn_kernels_avx2()) return *k;
      break;
    case SimdLevel::avx512:
      if (auto* k = attn_kernels_avx512()) return *k;
      break;
  }
  TQ_THROW("SIMD level ", to_string(level), " is not available on this CPU or build");
}

}  // namespace tq::kernels
