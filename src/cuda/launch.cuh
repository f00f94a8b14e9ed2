// Kernel launches shared by the decode kernels (CUDA sources only).
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <utility>
#include <vector>

#include "cuda/cuda_check.hpp"

namespace tq::cuda {

// Does `kernel`, as it runs on the current device, contain its
// griddepcontrol.wait? Only code compiled for a virtual architecture >= 9.0
// does (the wait sits behind __CUDA_ARCH__ >= 900): a build that carries only
// compute_80 PTX, JIT-compiled on an H200, has no wait, and launched as a
// programmatic dependent it could read the previous kernel's output before
// it is visible. Cached per (kernel, device).
inline bool kernel_waits_on_primary(const void* kernel) {
  struct Entry {
    const void* fn;
    int dev;
    bool waits;
  };
  static std::mutex mu;
  static std::vector<Entry> seen;
  int dev = 0;
  TQ_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard lk(mu);
  for (const Entry& e : seen)
    if (e.fn == kernel && e.dev == dev) return e.waits;
  cudaFuncAttributes a = {};
  TQ_CUDA_CHECK(cudaFuncGetAttributes(&a, kernel));
  seen.push_back({kernel, dev, a.ptxVersion >= 90});
  return seen.back().waits;
}

// kernel<<<grid, block, 0, stream>>>(args...); with overlap, as a
// programmatic dependent (sm_90) of the kernel before it on the stream,
// which triggers it (griddepcontrol.launch_dependents): the kernel may start
// before that one ends and must itself wait (griddepcontrol.wait) before it
// reads what that one writes. The overlap is an optimisation: where the
// kernel was not compiled with its wait (kernel_waits_on_primary) it is not
// asked for, and where the runtime refuses it, the launch is retried plainly.
// (smem: dynamic shared memory bytes.)
template <class... Params, class... Args>
void launch_maybe_dependent_smem(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t stream, bool overlap, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  overlap = overlap && kernel_waits_on_primary(reinterpret_cast<const void*>(kernel));
  cfg.numAttrs = overlap ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  if (e != cudaSuccess && overlap) {
    (void)cudaGetLastError();
    cfg.numAttrs = 0;
    e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  }
  TQ_CUDA_CHECK(e);
}
template <class... Params, class... Args>
void launch_maybe_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                            bool overlap, Args&&... args) {
  launch_maybe_dependent_smem(kernel, grid, block, 0, stream, overlap, std::forward<Args>(args)...);
}

}  // namespace tq::cuda
