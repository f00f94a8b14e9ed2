// Run-time choice of the kernel table: decided once, overridable for tests
// (tq::set_simd_level) or from the environment (TQ_SIMD=scalar|avx2|avx512).
#include <atomic>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <cstdlib>

#include "kernels/cpu_features.hpp"
#include "kernels/kernels.hpp"
#include "turboquant/error.hpp"

namespace tq {
namespace {

SimdLevel initial_level() {
  if (const char* env = std::getenv("TQ_SIMD"); env && *env) {
    const SimdLevel want = parse_simd_level(env);
    if (static_cast<int>(want) > static_cast<int>(best_simd_level()))
      TQ_THROW("TQ_SIMD=", env, " is not supported on this CPU or build (best: ",
               to_string(best_simd_level()), ")");
    return want;
  }
  return best_simd_level();
}

std::atomic<int>& level_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_level())};
  return slot;
}

}  // namespace

SimdLevel best_simd_level() {
  if (kernels::kernels_avx512()) return SimdLevel::avx512;
  if (kernels::kernels_avx2()) return SimdLevel::avx2;
  return SimdLevel::scalar;
}

SimdLevel simd_level() { return static_cast<SimdLevel>(level_slot().load()); }

void set_simd_level(SimdLevel level) {
  if (static_cast<int>(level) > static_cast<int>(best_simd_level()))
    TQ_THROW("SIMD level ", to_string(level), " is not available here (best: ",
             to_string(best_simd_level()), ")");
  level_slot().store(static_cast<int>(level));
}

std::vector<SimdLevel> available_simd_levels() {
  std::vector<SimdLevel> out{SimdLevel::scalar};
  if (kernels::kernels_avx2()) out.push_back(SimdLevel::avx2);
  if (kernels::kernels_avx512()) out.push_back(SimdLevel::avx512);
  return out;
}

std::string to_string(SimdLevel level) {
  switch (level) {
    case SimdLevel::scalar: return "scalar";
    case SimdLevel::avx2: return "avx2";
    case SimdLevel::avx512: return "avx512";
  }
  return "?";
}

SimdLevel parse_simd_level(const std::string& name) {
  if (name == "scalar") return SimdLevel::scalar;
  if (name == "avx2") return SimdLevel::avx2;
  if (name == "avx512") return SimdLevel::avx512;
  TQ_THROW("unknown SIMD level '", name, "' (valid: scalar, avx2, avx512)");
}

namespace kernels {

#if defined(__x86_64__) || defined(__i386__)
// F16C by CPUID (leaf 1, ECX bit 29): older clang's __builtin_cpu_supports lacks it.
static bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}

bool cpu_supports(SimdLevel level) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    cpu_has_f16c() && __builtin_cpu_supports("bmi2");
  switch (level) {
    case SimdLevel::scalar: return true;
    case SimdLevel::avx2: return avx2;
    case SimdLevel::avx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
}
#else
bool cpu_supports(SimdLevel level) { return level == SimdLevel::scalar; }
#endif

#ifndef TQ_X86_SIMD
const Kernels* kernels_avx2() { return nullptr; }
const Kernels* kernels_avx512() { return nullptr; }
#endif

const Kernels& kernels_for(SimdLevel level) {
  switch (level) {
    case SimdLevel::scalar: return kernels_ref();
    case SimdLevel::avx2:
      if (auto* k = kernels_avx2()) return *k;
      break;
    case SimdLevel::avx512:
      if (auto* k = kernels_avx512()) return *k;
      break;
  }
  TQ_THROW("SIMD level ", to_string(level), " is not available on this CPU or build");
}

const Kernels& kernels_active() { return kernels_for(simd_level()); }

}  // namespace kernels
}  // namespace tq
