// Kernel launches shared by the decode kernels (CUDA sources only).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "cuda/cuda_check.hpp"

namespace tq::cuda {

// kernel<<<grid, block, 0, stream>>>(args...); with overlap, as a
// programmatic dependent (sm_90) of the kernel before it on the stream,
// which triggers it (griddepcontrol.launch_dependents): the kernel may start
// before that one ends and must itself wait (griddepcontrol.wait) before it
// reads what that one writes. The overlap is an optimisation: where the
// runtime refuses it, the launch is retried plainly.
template <class... Params, class... Args>
void launch_maybe_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                            bool overlap, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = overlap ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  if (e != cudaSuccess && overlap) {
    (void)cudaGetLastError();
    cfg.numAttrs = 0;
    e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  }
  TQ_CUDA_CHECK(e);
}

}  // namespace tq::cuda
