// Scalar dequantization of the ggml block types (layouts in ggml_blocks.hpp).
// Blocks are copied out with memcpy: inside a GGUF file they are not aligned
// to their members (an 18-byte Q4_0 block, say).
#include "turboquant/ggml_blocks.hpp"

#include <cstring>

#include "turboquant/error.hpp"
#include "turboquant/half.hpp"

namespace tq::ggml {
namespace {

template <class B>
B load(const uint8_t* p) {
  B b;
  std::memcpy(&b, p, sizeof(B));
  return b;
}

float h(uint16_t v) { return half_to_float(v); }

void row_q4_0(const uint8_t* p, size_t nb, float* y) {
  for (size_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = load<BlockQ4_0>(p + i * sizeof(BlockQ4_0));
    const float d = h(b.d);
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = (int(b.qs[j] & 0x0f) - 8) * d;
      y[j + kQK / 2] = (int(b.qs[j] >> 4) - 8) * d;
    }
  }
}

void row_q4_1(const uint8_t* p, size_t nb, float* y) {
  for (size_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = load<BlockQ4_1>(p + i * sizeof(BlockQ4_1));
    const float d = h(b.d), m = h(b.m);
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = (b.qs[j] & 0x0f) * d + m;
      y[j + kQK / 2] = (b.qs[j] >> 4) * d + m;
    }
  }
}

// The fifth bit of element j is bit j of the 32-bit qh.
uint32_t qh32(const uint8_t* qh) {
  return uint32_t(qh[0]) | uint32_t(qh[1]) << 8 | uint32_t(qh[2]) << 16 | uint32_t(qh[3]) << 24;
}

void row_q5_0(const uint8_t* p, size_t nb, float* y) {
  for (size_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = load<BlockQ5_0>(p + i * sizeof(BlockQ5_0));
    const float d = h(b.d);
    const uint32_t qh = qh32(b.qh);
    for (int j = 0; j < kQK / 2; ++j) {
      const int lo = (b.qs[j] & 0x0f) | ((qh >> j) & 1) << 4;
      const int hi = (b.qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
      y[j] = (lo - 16) * d;
      y[j + kQK / 2] = (hi - 16) * d;
    }
  }
}

void row_q5_1(const uint8_t* p, size_t nb, float* y) {
  for (size_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = load<BlockQ5_1>(p + i * sizeof(BlockQ5_1));
    const float d = h(b.d), m = h(b.m);
    const uint32_t qh = qh32(b.qh);
    for (int j = 0; j < kQK / 2; ++j) {
      const int lo = (b.qs[j] & 0x0f) | ((qh >> j) & 1) << 4;
      const int hi = (b.qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
      y[j] = lo * d + m;
      y[j + kQK / 2] = hi * d + m;
    }
  }
}

void row_q8_0(const uint8_t* p, size_t nb, float* y) {
  for (size_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = load<BlockQ8_0>(p + i * sizeof(BlockQ8_0));
    const float d = h(b.d);
    for (int j = 0; j < kQK; ++j) y[j] = b.qs[j] * d;
  }
}

void row_q8_1(const uint8_t* p, size_t nb, float* y) {
  for (size_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = load<BlockQ8_1>(p + i * sizeof(BlockQ8_1));
    const float d = h(b.d);
    for (int j = 0; j < kQK; ++j) y[j] = b.qs[j] * d;
  }
}

// Sub-block j (0..7) of a Q4_K/Q5_K super-block: 6-bit scale and min packed
// in 12 bytes. Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3;
// for j >= 4 the low 4 bits come from bytes 8-11 and the top 2 bits from the
// spare top bits of bytes 0-7.
void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void row_q4_k(const uint8_t* p, size_t nb, float* y) {
  for (size_t i = 0; i < nb; ++i) {
    const auto b = load<BlockQ4_K>(p + i * sizeof(BlockQ4_K));
    const float d = h(b.d), dmin = h(b.dmin);
    const uint8_t* q = b.qs;
    for (int g = 0; g < 4; ++g) {  // 64 elements: sub-blocks 2g (low nibbles), 2g+1 (high)
      uint8_t sc1, m1, sc2, m2;
      scale_min_k4(2 * g, b.scales, &sc1, &m1);
      scale_min_k4(2 * g + 1, b.scales, &sc2, &m2);
      const float d1 = d * sc1, mn1 = dmin * m1, d2 = d * sc2, mn2 = dmin * m2;
      for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0x0f) - mn1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - mn2;
      q += 32;
    }
  }
}

void row_q5_k(const uint8_t* p, size_t nb, float* y) {
  for (size_t i = 0; i < nb; ++i) {
    const auto b = load<BlockQ5_K>(p + i * sizeof(BlockQ5_K));
    const float d = h(b.d), dmin = h(b.dmin);
    const uint8_t* q = b.qs;
    for (int g = 0; g < 4; ++g) {
      uint8_t sc1, m1, sc2, m2;
      scale_min_k4(2 * g, b.scales, &sc1, &m1);
      scale_min_k4(2 * g + 1, b.scales, &sc2, &m2);
      const float d1 = d * sc1, mn1 = dmin * m1, d2 = d * sc2, mn2 = dmin * m2;
      const uint8_t u1 = uint8_t(1u << (2 * g)), u2 = uint8_t(2u << (2 * g));
      for (int l = 0; l < 32; ++l) *y++ = d1 * ((q[l] & 0x0f) + (b.qh[l] & u1 ? 16 : 0)) - mn1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * ((q[l] >> 4) + (b.qh[l] & u2 ? 16 : 0)) - mn2;
      q += 32;
    }
  }
}

void row_q6_k(const uint8_t* p, size_t nb, float* y) {
  for (size_t i = 0; i < nb; ++i) {
    const auto b = load<BlockQ6_K>(p + i * sizeof(BlockQ6_K));
    const float d = h(b.d);
    const uint8_t* ql = b.ql;
    const uint8_t* qh = b.qh;
    const int8_t* sc = b.scales;
    for (int half = 0; half < 2; ++half) {  // 128 elements each
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = int((ql[l] & 0x0f) | ((qh[l] >> 0) & 3) << 4) - 32;
        const int q2 = int((ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4) - 32;
        const int q3 = int((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
        const int q4 = int((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
        y[l] = d * sc[is + 0] * q1;
        y[l + 32] = d * sc[is + 2] * q2;
        y[l + 64] = d * sc[is + 4] * q3;
        y[l + 96] = d * sc[is + 6] * q4;
      }
      y += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
}

void row_q8_k(const uint8_t* p, size_t nb, float* y) {
  for (size_t i = 0; i < nb; ++i, y += kQKK) {
    const auto b = load<BlockQ8_K>(p + i * sizeof(BlockQ8_K));
    for (int j = 0; j < kQKK; ++j) y[j] = b.d * b.qs[j];
  }
}

}  // namespace

const TypeTraits& traits(Type t) {
  static const TypeTraits kF32{"F32", 1, 4, true}, kF16{"F16", 1, 2, true},
      kBF16{"BF16", 1, 2, true}, kQ4_0{"Q4_0", kQK, sizeof(BlockQ4_0), true},
      kQ4_1{"Q4_1", kQK, sizeof(BlockQ4_1), true}, kQ5_0{"Q5_0", kQK, sizeof(BlockQ5_0), true},
      kQ5_1{"Q5_1", kQK, sizeof(BlockQ5_1), true}, kQ8_0{"Q8_0", kQK, sizeof(BlockQ8_0), true},
      kQ8_1{"Q8_1", kQK, sizeof(BlockQ8_1), true}, kQ2_K{"Q2_K", kQKK, 84, false},
      kQ3_K{"Q3_K", kQKK, 110, false}, kQ4_K{"Q4_K", kQKK, sizeof(BlockQ4_K), true},
      kQ5_K{"Q5_K", kQKK, sizeof(BlockQ5_K), true}, kQ6_K{"Q6_K", kQKK, sizeof(BlockQ6_K), true},
      kQ8_K{"Q8_K", kQKK, sizeof(BlockQ8_K), true};
  switch (t) {
    case Type::f32: return kF32;
    case Type::f16: return kF16;
    case Type::bf16: return kBF16;
    case Type::q4_0: return kQ4_0;
    case Type::q4_1: return kQ4_1;
    case Type::q5_0: return kQ5_0;
    case Type::q5_1: return kQ5_1;
    case Type::q8_0: return kQ8_0;
    case Type::q8_1: return kQ8_1;
    case Type::q2_k: return kQ2_K;
    case Type::q3_k: return kQ3_K;
    case Type::q4_k: return kQ4_K;
    case Type::q5_k: return kQ5_K;
    case Type::q6_k: return kQ6_K;
    case Type::q8_k: return kQ8_K;
  }
  TQ_THROW("unknown ggml tensor type id ", static_cast<uint32_t>(t));
}

bool is_known_type(uint32_t id) {
  switch (static_cast<Type>(id)) {
    case Type::f32: case Type::f16: case Type::bf16: case Type::q4_0: case Type::q4_1:
    case Type::q5_0: case Type::q5_1: case Type::q8_0: case Type::q8_1: case Type::q2_k:
    case Type::q3_k: case Type::q4_k: case Type::q5_k: case Type::q6_k: case Type::q8_k:
      return true;
  }
  return false;
}

std::string to_string(Type t) {
  return is_known_type(static_cast<uint32_t>(t)) ? traits(t).name
                                                 : "type#" + std::to_string(static_cast<uint32_t>(t));
}

size_t row_bytes(Type t, size_t n) {
  const TypeTraits& tr = traits(t);
  TQ_REQUIRE(n % tr.block_elems == 0, tr.name, ": ", n, " elements is not a multiple of the block size ",
             tr.block_elems);
  return n / tr.block_elems * tr.block_bytes;
}

void dequantize_row(Type t, const void* src, size_t n, float* y) {
  const auto* p = static_cast<const uint8_t*>(src);
  const TypeTraits& tr = traits(t);
  TQ_REQUIRE(tr.supported, "dequantizing ", tr.name, " tensors is not supported (yet)");
  const size_t nb = row_bytes(t, n) / tr.block_bytes;
  switch (t) {
    case Type::f32: std::memcpy(y, p, n * 4); return;
    case Type::f16:
      for (size_t i = 0; i < n; ++i) y[i] = half_to_float(uint16_t(p[2 * i] | p[2 * i + 1] << 8));
      return;
    case Type::bf16:
      for (size_t i = 0; i < n; ++i) y[i] = bf16_to_float(uint16_t(p[2 * i] | p[2 * i + 1] << 8));
      return;
    case Type::q4_0: row_q4_0(p, nb, y); return;
    case Type::q4_1: row_q4_1(p, nb, y); return;
    case Type::q5_0: row_q5_0(p, nb, y); return;
    case Type::q5_1: row_q5_1(p, nb, y); return;
    case Type::q8_0: row_q8_0(p, nb, y); return;
    case Type::q8_1: row_q8_1(p, nb, y); return;
    case Type::q4_k: row_q4_k(p, nb, y); return;
    case Type::q5_k: row_q5_k(p, nb, y); return;
    case Type::q6_k: row_q6_k(p, nb, y); return;
    case Type::q8_k: row_q8_k(p, nb, y); return;
    default: break;
  }
  TQ_THROW("dequantizing ", tr.name, " is not supported");
}

}  // namespace tq::ggml
