// What the running CPU supports, checked once. Compiled for baseline x86-64
// (dispatch.cpp) so the ISA files can call it before running any of their code.
#pragma once

#include "turboquant/simd.hpp"

namespace tq::kernels {

// avx2: AVX2 + FMA + F16C + BMI2; avx512: that plus AVX-512 F/BW/VL/DQ.
bool cpu_supports(SimdLevel level);

}  // namespace tq::kernels
