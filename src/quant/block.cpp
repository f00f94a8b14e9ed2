// Baselines: llama.cpp-style q8_0 / q4_0 blocks (optionally after a random
// rotation, as llama.cpp now does for its quantized caches) and dense
// f32 / f16 / bf16 records.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/attn_kernels.hpp"
#include "quant/quantizers.hpp"
#include "quant/scratch.hpp"
#include "turboquant/error.hpp"
#include "turboquant/half.hpp"
#include "turboquant/rng.hpp"

namespace tq::quant {
namespace {

void put_u16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
uint16_t get_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }

// q8_0: d = max|x| / 127, q = round(x / d).
void encode_q8_0(const float* x, uint8_t* blk) {
  float amax = 0.0f;
  for (int i = 0; i < kBlockElems; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  TQ_REQUIRE(d <= kHalfMax, "q8_0 block scale ", d, " does not fit fp16");
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_u16(blk, float_to_half(d));
  for (int i = 0; i < kBlockElems; ++i)
    blk[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(std::lround(x[i] * id)));
}

void decode_q8_0(const uint8_t* blk, float* x) {
  const float d = half_to_float(get_u16(blk));
  for (int i = 0; i < kBlockElems; ++i) x[i] = static_cast<int8_t>(blk[2 + i]) * d;
}

// q4_0: the element of largest magnitude m maps to code 0: d = m / -8,
// q = clamp(round(x / d) + 8, 0, 15); x = (q - 8) d.
void encode_q4_0(const float* x, uint8_t* blk) {
  float amax = 0.0f, m = 0.0f;
  for (int i = 0; i < kBlockElems; ++i)
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      m = x[i];
    }
  const float d = m / -8.0f;
  TQ_REQUIRE(std::fabs(d) <= kHalfMax, "q4_0 block scale ", d, " does not fit fp16");
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_u16(blk, float_to_half(d));
  auto code = [&](float v) {
    return static_cast<uint8_t>(std::min(15, static_cast<int>(v * id + 8.5f)));
  };
  for (int i = 0; i < 16; ++i)
    blk[2 + i] = static_cast<uint8_t>(code(x[i]) | code(x[i + 16]) << 4);
}

void decode_q4_0(const uint8_t* blk, float* x) {
  const float d = half_to_float(get_u16(blk));
  for (int i = 0; i < 16; ++i) {
    x[i] = (static_cast<int>(blk[2 + i] & 0x0f) - 8) * d;
    x[i + 16] = (static_cast<int>(blk[2 + i] >> 4) - 8) * d;
  }
}

}  // namespace

BlockQuantizer::BlockQuantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd)
    : Quantizer(spec, dim, seed, simd),
      rot_(spec.rotation, dim, derive_seed(seed, "rotation"), simd) {}

void BlockQuantizer::encode_one(const float* x, uint8_t* rec) const {
  const int d = dim();
  Scratch s(d);
  checked_norm(kernels::kernels_for(simd()), x, d);  // rejects NaN/Inf
  rot_.forward(x, s.y);
  const bool q8 = spec().method == Method::q8_0;
  const size_t blk = q8 ? sizeof(BlockQ8_0) : sizeof(BlockQ4_0);
  for (int b = 0; b < d / kBlockElems; ++b) {
    if (q8) encode_q8_0(s.y + b * kBlockElems, rec + b * blk);
    else encode_q4_0(s.y + b * kBlockElems, rec + b * blk);
  }
}

void BlockQuantizer::decode_one(const uint8_t* rec, float* x) const {
  decode_domain(rec, x);
  rot_.inverse(x, x);
}

void BlockQuantizer::decode_domain(const uint8_t* rec, float* x) const {
  const int d = dim();
  const bool q8 = spec().method == Method::q8_0;
  const size_t blk = q8 ? sizeof(BlockQ8_0) : sizeof(BlockQ4_0);
  for (int b = 0; b < d / kBlockElems; ++b) {
    if (q8) decode_q8_0(rec + b * blk, x + b * kBlockElems);
    else decode_q4_0(rec + b * blk, x + b * kBlockElems);
  }
}

void BlockQuantizer::score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
                           float* scores) const {
  const auto& k = kernels::attn_kernels_for(simd());
  if (!k.score_blocks) return Quantizer::score(qp, g, recs, stride, n, scores);
  k.score_blocks(spec().method == Method::q8_0 ? 0 : 1, qp, g, dim(), recs, stride, n, scores);
}

void BlockQuantizer::accumulate(const float* w, int g, const uint8_t* recs, size_t stride,
                                size_t n, float* acc) const {
  const auto& k = kernels::attn_kernels_for(simd());
  if (!k.accumulate_blocks) return Quantizer::accumulate(w, g, recs, stride, n, acc);
  k.accumulate_blocks(spec().method == Method::q8_0 ? 0 : 1, w, g, dim(), recs, stride, n, acc);
}

DenseQuantizer::DenseQuantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd)
    : Quantizer(spec, dim, seed, simd) {}

void DenseQuantizer::encode_one(const float* x, uint8_t* rec) const {
  const int d = dim();
  for (int i = 0; i < d; ++i)
    TQ_REQUIRE(std::isfinite(x[i]), "component ", i, " is ", x[i], " (NaN/Inf cannot be stored)");
  switch (spec().method) {
    case Method::f32: std::memcpy(rec, x, sizeof(float) * d); break;  // little-endian hosts
    case Method::f16:
      for (int i = 0; i < d; ++i) {
        TQ_REQUIRE(std::fabs(x[i]) <= kHalfMax, "component ", i, " = ", x[i],
                   " overflows f16 (max 65504)");
        put_u16(rec + 2 * i, float_to_half(x[i]));
      }
      break;
    case Method::bf16:
      for (int i = 0; i < d; ++i) put_u16(rec + 2 * i, float_to_bf16(x[i]));
      break;
    default: TQ_ASSERT(false);
  }
}

void DenseQuantizer::decode_one(const uint8_t* rec, float* x) const {
  const int d = dim();
  switch (spec().method) {
    case Method::f32: std::memcpy(x, rec, sizeof(float) * d); break;
    case Method::f16:
      for (int i = 0; i < d; ++i) x[i] = half_to_float(get_u16(rec + 2 * i));
      break;
    case Method::bf16:
      for (int i = 0; i < d; ++i) x[i] = bf16_to_float(get_u16(rec + 2 * i));
      break;
    default: TQ_ASSERT(false);
  }
}

namespace {
int dense_kind(Method m) {
  switch (m) {
    case Method::f32: return 0;
    case Method::f16: return 1;
    case Method::bf16: return 2;
    default: TQ_ASSERT(false);
  }
  return 0;
}
}  // namespace

// Attention straight from the stored values (f16 via F16C, bf16 by a shift),
// each record read once for the g query heads.
void DenseQuantizer::score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
                           float* scores) const {
  kernels::attn_kernels_for(simd()).score_dense(dense_kind(spec().method), qp, g, dim(), recs,
                                                stride, n, scores);
}

void DenseQuantizer::accumulate(const float* w, int g, const uint8_t* recs, size_t stride,
                                size_t n, float* acc) const {
  kernels::attn_kernels_for(simd()).accumulate_dense(dense_kind(spec().method), w, g, dim(), recs,
                                                     stride, n, acc);
}

}  // namespace tq::quant
