// Internal: the in-register stages of a Walsh-Hadamard transform of a vector
// that a warp holds N elements a lane, v[k] = element lane + 32 k (the other
// stages, over the lane bits, go by shuffles or shared memory at the caller).
#pragma once

namespace tq::cuda {

// Unnormalised butterflies over the register index k, stride 1, 2, ..., B/2:
// (v[k], v[k + h]) -> (v[k] + v[k + h], v[k] - v[k + h]) for every k without
// bit h, i.e. an in-register transform of each block of B registers
// (B = N: the whole vector; fwht_registers).
template <int B, int N>
__device__ __forceinline__ void fwht_register_blocks(float (&v)[N]) {
  static_assert(B >= 1 && B <= N && N % B == 0);
#pragma unroll
  for (int h = 1; h < B; h *= 2)
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (!(k & h)) {
        const float a = v[k], b = v[k + h];
        v[k] = a + b;
        v[k + h] = a - b;
      }
}
template <int N>
__device__ __forceinline__ void fwht_registers(float (&v)[N]) {
  fwht_register_blocks<N>(v);
}

}  // namespace tq::cuda
