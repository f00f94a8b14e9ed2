// The quantize-append kernels for f16 input (mse_append_kernel.cuh).
#include "cuda/mse_append_kernel.cuh"

namespace tq::cuda {

void launch_append_f16(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t stream) {
  launch_dtype<DType::f16>(a, fmt, stream);
}

}  // namespace tq::cuda
