// The quantize-append kernels for f32 input (mse_append_kernel.cuh).
#include "cuda/mse_append_kernel.cuh"

namespace tq::cuda {

void launch_append_f32(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t stream) {
  launch_dtype<DType::f32>(a, fmt, stream);
}
void launch_append_kv_f32(const AppendLaunch& a, const AppendFormat& kf, const void* x_v, size_t region_offset_v,
                         const AppendFormat& vf, cudaStream_t stream) {
  launch_kv_dtype<DType::f32>(a, kf, x_v, region_offset_v, vf, stream);
}

}  // namespace tq::cuda
