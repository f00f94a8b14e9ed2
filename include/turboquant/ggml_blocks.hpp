// ggml tensor types and their block layouts, as stored in GGUF files (from
// the format's documentation). Every block is a plain struct with a
// static_assert on its size; dequantize_row() turns n elements (a multiple
// of the type's block size) into floats.
//
//   std::vector<float> w(n);
//   tq::ggml::dequantize_row(tq::ggml::Type::q4_k, bytes, n, w.data());
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tq::ggml {

enum class Type : uint32_t {
  f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q5_0 = 6,
  q5_1 = 7,
  q8_0 = 8,
  q8_1 = 9,
  q2_k = 10,
  q3_k = 11,
  q4_k = 12,
  q5_k = 13,
  q6_k = 14,
  q8_k = 15,
  bf16 = 30,
};

constexpr int kQK = 32;    // elements per block of the legacy types
constexpr int kQKK = 256;  // elements per K-quant super-block

struct BlockQ4_0 { uint16_t d; uint8_t qs[kQK / 2]; };
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[kQK / 2]; };
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[kQK / 2]; };
struct BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[kQK / 2]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[kQK]; };
struct BlockQ8_1 { uint16_t d, s; int8_t qs[kQK]; };
// K-quants: 256 elements in 8 (Q4_K, Q5_K) or 16 (Q6_K) sub-blocks with
// 6-bit (packed into 12 bytes) or 8-bit sub-block scales.
struct BlockQ4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[kQKK / 2]; };
struct BlockQ5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[kQKK / 8]; uint8_t qs[kQKK / 2]; };
struct BlockQ6_K { uint8_t ql[kQKK / 2]; uint8_t qh[kQKK / 4]; int8_t scales[kQKK / 16]; uint16_t d; };
struct BlockQ8_K { float d; int8_t qs[kQKK]; int16_t bsums[kQKK / 16]; };

static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ8_1) == 36);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);
static_assert(sizeof(BlockQ8_K) == 292);

struct TypeTraits {
  const char* name;
  int block_elems;     // elements per block
  size_t block_bytes;  // bytes per block
  bool supported;      // dequantize_row implements it
};
// Throws tq::Error for a type id this project does not know.
const TypeTraits& traits(Type t);
bool is_known_type(uint32_t id);
std::string to_string(Type t);

// Bytes of n elements (n must be a multiple of the block size; checked).
size_t row_bytes(Type t, size_t n);

// src: row_bytes(t, n) bytes, dst: [n]. Scalar reference.
void dequantize_row(Type t, const void* src, size_t n, float* dst);

}  // namespace tq::ggml
