// Internal: the rotation of one segment of a channel-split format
// (SegmentRotation, kernels.hpp) applied by a whole thread block to vectors
// in shared memory. Forward is Rotation::forward of src/core/rotation.cpp
// operation for operation (sign flips, butterflies, one multiply by the
// block's scale, a gather), so the append kernel's codes stay bit-identical
// to the CPU's; inverse is Rotation::inverse (the stages reversed; the
// normalised Hadamard blocks are their own inverse).
#pragma once

#include <cuda_runtime.h>

#include "cuda/kernels.hpp"

namespace tq::cuda {

// rows vectors, vector r's segment at x[r * stride + 0 .. dim); tmp: rows *
// stride floats of scratch (the permutation). Every thread of the block
// calls it; it ends with __syncthreads().
struct SegmentRotator {
  const SegmentRotation& R;
  float* x;
  float* tmp;
  int rows, stride;

  __device__ void signs(const float* s) const {
    for (int idx = threadIdx.x; idx < rows * R.dim; idx += blockDim.x) {
      const int r = idx / R.dim, i = idx % R.dim;
      x[r * stride + i] = __fmul_rn(x[r * stride + i], s[i]);
    }
    __syncthreads();
  }
  __device__ void blocks() const {
    int off = 0;
    for (int b = 0; b < R.n_blocks; ++b) {
      const int n = R.blocks[b];
      for (int h = 1; h < n; h *= 2) {
        for (int idx = threadIdx.x; idx < rows * (n / 2); idx += blockDim.x) {
          const int r = idx / (n / 2), p = idx % (n / 2);
          float* v = x + r * stride + off;
          const int j = (p / h) * 2 * h + p % h;
          const float a = v[j], c = v[j + h];
          v[j] = __fadd_rn(a, c);
          v[j + h] = __fsub_rn(a, c);
        }
        __syncthreads();
      }
      const float s = R.block_scale[b];
      for (int idx = threadIdx.x; idx < rows * n; idx += blockDim.x) {
        const int r = idx / n, i = idx % n;
        x[r * stride + off + i] = __fmul_rn(x[r * stride + off + i], s);
      }
      __syncthreads();
      off += n;
    }
  }
  __device__ void permute(bool inverse) const {
    for (int idx = threadIdx.x; idx < rows * R.dim; idx += blockDim.x) {
      const int r = idx / R.dim, i = idx % R.dim;
      tmp[r * stride + i] = x[r * stride + i];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < rows * R.dim; idx += blockDim.x) {
      const int r = idx / R.dim, i = idx % R.dim;
      if (inverse) x[r * stride + R.perm[i]] = tmp[r * stride + i];
      else x[r * stride + i] = tmp[r * stride + R.perm[i]];
    }
    __syncthreads();
  }

  __device__ void forward() const {
    signs(R.signs1);
    blocks();
    if (R.perm != nullptr) {
      permute(false);
      signs(R.signs2);
      blocks();
    }
  }
  __device__ void inverse() const {
    if (R.perm != nullptr) {
      blocks();
      signs(R.signs2);
      permute(true);
    }
    blocks();
    signs(R.signs1);
  }
};

}  // namespace tq::cuda
