// Internal: every CUDA runtime call and kernel launch is checked.
//
//   TQ_CUDA_CHECK(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice));
//   kernel<<<grid, block, smem, stream>>>(...);
//   TQ_CUDA_CHECK_LAUNCH();
#pragma once

#include <cuda_runtime_api.h>

#include "turboquant/error.hpp"

namespace tq::cuda::detail {
[[noreturn]] inline void cuda_fail(cudaError_t e, const char* expr, const char* file, int line) {
  TQ_THROW("CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ") in ", expr, " at ",
           file, ":", line);
}
}  // namespace tq::cuda::detail

#define TQ_CUDA_CHECK(expr)                                                              \
  do {                                                                                   \
    const cudaError_t tq_cuda_err_ = (expr);                                             \
    if (tq_cuda_err_ != cudaSuccess)                                                     \
      ::tq::cuda::detail::cuda_fail(tq_cuda_err_, #expr, __FILE__, __LINE__);            \
  } while (0)
// Right after a launch: configuration errors (and, in debug builds of callers
// that synchronise, earlier asynchronous faults).
#define TQ_CUDA_CHECK_LAUNCH() TQ_CUDA_CHECK(cudaGetLastError())
