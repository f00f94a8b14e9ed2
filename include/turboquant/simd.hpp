// Which instruction set the CPU kernels use. Chosen once (the best the CPU
// supports) unless overridden, e.g. by tests that run every compiled path, or
// by the TQ_SIMD environment variable (scalar|avx2|avx512).
//
//   tq::set_simd_level(tq::SimdLevel::scalar);  // force the reference path
#pragma once

#include <string>
#include <vector>

namespace tq {

enum class SimdLevel { scalar = 0, avx2 = 1, avx512 = 2 };

SimdLevel best_simd_level();             // what this CPU and build support
SimdLevel simd_level();                  // the level new objects will use
void set_simd_level(SimdLevel level);    // throws tq::Error if unsupported
std::vector<SimdLevel> available_simd_levels();  // scalar first
std::string to_string(SimdLevel level);
SimdLevel parse_simd_level(const std::string& name);

}  // namespace tq
