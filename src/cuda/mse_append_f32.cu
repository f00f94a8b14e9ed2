// The quantize-append kernels for f32 input (mse_append_kernel.cuh).
#include "cuda/mse_append_kernel.cuh"

namespace tq::cuda {

void launch_append_f32(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t stream) {
  launch_dtype<DType::f32>(a, fmt, stream);
}

}  // namespace tq::cuda
