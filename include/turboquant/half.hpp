// IEEE 754 binary16 and bfloat16 conversions, exact and portable.
// float_to_half rounds to nearest even, keeps subnormals, maps overflow to
// +-inf and NaN to a quiet NaN -- the same result as the F16C instruction
// with _MM_FROUND_TO_NEAREST_INT, so SIMD paths can use either.
//
//   uint16_t h = tq::float_to_half(0.1f);  float f = tq::half_to_float(h);
#pragma once

#include <cstdint>

namespace tq {

uint16_t float_to_half(float f);
float half_to_float(uint16_t h);
uint16_t float_to_bf16(float f);  // round to nearest even
float bf16_to_float(uint16_t h);

constexpr float kHalfMax = 65504.0f;

}  // namespace tq
