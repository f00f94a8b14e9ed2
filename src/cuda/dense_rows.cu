// Dense tokens of the GPU KV layer (GpuKvLayerConfig::dense_window /
// dense_prefix): appended K/V rounded to the f16 rows the layer keeps, with
// what KvCache's f16 dense format refuses flagged in a status word; and the
// row moves of a batched decode append, all in one launch.
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

// Block i moves copy i (16-byte pieces; none when dst_k is null); the
// states ride along.
__global__ void dense_row_copies_kernel(const DenseRowCopy* __restrict__ copies, size_t row_bytes,
                                        const int* __restrict__ states, int* __restrict__ state,
                                        const int* __restrict__ only_if_clean, int* sticky) {
  const int st = only_if_clean != nullptr ? *only_if_clean : 0;
  if (sticky != nullptr && st != 0 && blockIdx.x == 0 && threadIdx.x == 0) atomicOr(sticky, st);
  if (st != 0 || (sticky != nullptr && *sticky != 0)) return;
  const DenseRowCopy c = copies[blockIdx.x];
  const size_t n16 = c.dst_k != nullptr ? row_bytes / 16 : 0;
  for (size_t j = threadIdx.x; j < n16; j += blockDim.x) {
    reinterpret_cast<uint4*>(c.dst_k)[j] = reinterpret_cast<const uint4*>(c.src_k)[j];
    reinterpret_cast<uint4*>(c.dst_v)[j] = reinterpret_cast<const uint4*>(c.src_v)[j];
  }
  if (states != nullptr && threadIdx.x < 3)
    state[3 * states[4 * blockIdx.x] + threadIdx.x] = states[4 * blockIdx.x + 1 + threadIdx.x];
}

}  // namespace

void launch_dense_row_copies(const DenseRowCopy* copies, int n, size_t row_bytes, const int* states,
                             int* state, const int* only_if_clean, int* sticky, cudaStream_t stream) {
  if (n == 0) return;
  TQ_ASSERT(row_bytes % 16 == 0);
  dense_row_copies_kernel<<<n, 128, 0, stream>>>(copies, row_bytes, states, state, only_if_clean, sticky);
  TQ_CUDA_CHECK(cudaGetLastError());
}

void launch_to_f16_rows(const void* src, DType dtype, size_t n, uint16_t* dst, int* status,
                        cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const int blocks = int(std::min<size_t>((n + threads - 1) / threads, 4096));
  to_f16_rows_kernel<<<blocks, threads, 0, stream>>>(src, int(dtype), n, dst, status);
  TQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tq::cuda
