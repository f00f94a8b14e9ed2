// The quantize-append kernels for bf16 input (mse_append_kernel.cuh).
#include "cuda/mse_append_kernel.cuh"

namespace tq::cuda {

void launch_append_bf16(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t stream) {
  launch_dtype<DType::bf16>(a, fmt, stream);
}

}  // namespace tq::cuda
