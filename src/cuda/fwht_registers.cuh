// Internal: the in-register stages of a Walsh-Hadamard transform of a vector
// that a warp holds N elements a lane, v[k] = element lane + 32 k (the other
// stages, over the lane bits, go by shuffles or shared memory at the caller).
#pragma once

namespace tq::cuda {

// Unnormalised butterflies over the register index k, stride 1, 2, ..., N/2:
// (v[k], v[k + h]) -> (v[k] + v[k + h], v[k] - v[k + h]) for every k without bit h.
template <int N>
__device__ __forceinline__ void fwht_registers(float (&v)[N]) {
#pragma unroll
  for (int h = 1; h < N; h *= 2)
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (!(k & h)) {
        const float a = v[k], b = v[k + h];
        v[k] = a + b;
        v[k + h] = a - b;
      }
}

}  // namespace tq::cuda
