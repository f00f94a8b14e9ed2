// The quantize-append kernels for f16 input (mse_append_kernel.cuh).
#include "cuda/mse_append_kernel.cuh"

namespace tq::cuda {

void launch_append_f16(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t stream) {
  launch_dtype<DType::f16>(a, fmt, stream);
}
void launch_append_kv_f16(const AppendLaunch& a, const AppendFormat& kf, const void* x_v, size_t region_offset_v,
                         const AppendFormat& vf, cudaStream_t stream) {
  launch_kv_dtype<DType::f16>(a, kf, x_v, region_offset_v, vf, stream);
}

}  // namespace tq::cuda
