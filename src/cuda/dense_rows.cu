// Dense tokens of the GPU KV layer (GpuKvLayerConfig::dense_window /
// dense_prefix): appended K/V rounded to the f16 rows the layer keeps, with
// what KvCache's f16 dense format refuses flagged in a status word.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/cuda_check.hpp"
#include "cuda/mse_append_kernel.cuh"  // float_to_half_bits: the CPU's rounding in integer arithmetic

namespace tq::cuda {
namespace {

__global__ void to_f16_rows_kernel(const void* __restrict__ src, int dtype, size_t n,
                                   uint16_t* __restrict__ dst, int* __restrict__ status) {
  int st = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    float x;
    if (dtype == int(DType::f32)) x = static_cast<const float*>(src)[i];
    else if (dtype == int(DType::f16)) x = __half2float(__ushort_as_half(static_cast<const uint16_t*>(src)[i]));
    else x = __uint_as_float(unsigned(static_cast<const uint16_t*>(src)[i]) << 16);  // bf16: exact
    if (!isfinite(x)) st |= kStatusNonFinite;
    else if (fabsf(x) > kHalfMax) st |= kStatusDenseOverflow;
    dst[i] = static_cast<uint16_t>(float_to_half_bits(x));
  }
  if (st) atomicOr(status, st);
}

}  // namespace

void launch_to_f16_rows(const void* src, DType dtype, size_t n, uint16_t* dst, int* status,
                        cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const int blocks = int(std::min<size_t>((n + threads - 1) / threads, 4096));
  to_f16_rows_kernel<<<blocks, threads, 0, stream>>>(src, int(dtype), n, dst, status);
  TQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tq::cuda
