// Internal: the rotation of one segment of a channel-split format
// (SegmentRotation, kernels.hpp) applied by a whole thread block to vectors
// in shared memory (SegmentRotator), or by one warp to a vector in registers
// (warp_rotate_regs). Forward is Rotation::forward of src/core/rotation.cpp
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


// A channel-split segment's rotation blocks (SegmentRotation's, kept in
// shared memory so that no loop indexes the kernel's parameters).
struct RotMeta {
  int blocks[kMaxRotationBlocks];
  float scale[kMaxRotationBlocks];
  int n_blocks, two_rounds;
};
static_assert(sizeof(RotMeta) == 18 * 4);

// Stages what warp_rotate_regs reads of split f's two segment rotations in
// shared memory: signs1, signs2 (1 where a segment has one round) and perm
// (the identity there) over [seg 0 | seg 1], [n0 + seg 1's dim] each, perm
// relative to its segment; meta[2]. Every thread of the block calls it; the
// caller's barrier publishes it.
__device__ __forceinline__ void stage_split_rotation(const SplitFormat& f, int n0, float* s1, float* s2, int* perm,
                                                     RotMeta* meta) {
  const SegmentRotation& R0 = f.seg[0].rot;
  const SegmentRotation& R1 = f.seg[1].rot;
  for (int i = threadIdx.x; i < n0 + R1.dim; i += blockDim.x) {
    const bool lo = i >= n0;
    const int j = lo ? i - n0 : i;
    const int* pm = lo ? R1.perm : R0.perm;
    s1[i] = (lo ? R1.signs1 : R0.signs1)[j];
    perm[i] = pm != nullptr ? pm[j] : j;
    s2[i] = pm != nullptr ? (lo ? R1.signs2 : R0.signs2)[j] : 1.0f;
  }
  if (threadIdx.x < 2 * (kMaxRotationBlocks + 1)) {
    const int sg = threadIdx.x / (kMaxRotationBlocks + 1), b = threadIdx.x % (kMaxRotationBlocks + 1);
    if (b < kMaxRotationBlocks) {
      meta[sg].blocks[b] = sg ? R1.blocks[b] : R0.blocks[b];
      meta[sg].scale[b] = sg ? R1.block_scale[b] : R0.block_scale[b];
    } else {
      meta[sg].n_blocks = sg ? R1.n_blocks : R0.n_blocks;
      meta[sg].two_rounds = (sg ? R1.perm : R0.perm) != nullptr;
    }
  }
}


// The Hadamard stages of stride 32 hk (hk = 1, 2, .. < E) between a lane's
// registers t[k] and t[k ^ hk] (elements i and i ^ 32 hk), in ascending
// strides, where the pair's block (nb[k] elements) is wider than the stride:
// the lower element keeps a + c, the upper a - c (Rotation::forward's butterfly).
template <int E>
__device__ __forceinline__ void register_butterflies(float (&t)[E], const int (&nb)[E]) {
#pragma unroll
  for (int hk = 1; hk < E; hk *= 2) {
    float u[E];
#pragma unroll
    for (int k = 0; k < E; ++k) u[k] = t[k];
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int pk = k ^ hk;
      if (pk < E && 32 * hk < nb[k]) t[k] = (k & hk) ? __fsub_rn(u[pk], u[k]) : __fadd_rn(u[k], u[pk]);
    }
  }
}

// One segment's rotation after its first signs, by one warp, element i =
// lane + 32 k of the segment in t[k] (i >= n: ignored), in
// SegmentRotator::forward's order and operations: each Hadamard block's
// butterflies stage by stage (h < 32 across lanes, larger h between
// registers; the blocks are aligned to their power-of-two sizes, largest
// first, so both elements of a butterfly are in one block), one multiply by
// the block's scale; where there are two rounds the permutation with the
// second signs (through x, the segment's [n] floats of shared scratch) and
// the blocks again.
template <int E>
__device__ __forceinline__ void warp_rotate_regs(const RotMeta& m, int n, float (&t)[E], float* x, const float* s2,
                                                 const int* perm, int lane) {
  int nb[E];  // the block size of element i (1: none, i >= n)
  float sc[E];
#pragma unroll
  for (int k = 0; k < E; ++k) {
    nb[k] = 1;
    sc[k] = 1.0f;
  }
  for (int b = 0, off = 0; b < m.n_blocks; ++b) {
    const int sz = m.blocks[b];
    const float bs = m.scale[b];
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int i = lane + 32 * k;
      if (i >= off && i < off + sz) {
        nb[k] = sz;
        sc[k] = bs;
      }
    }
    off += sz;
  }
  auto blocks = [&] {
#pragma unroll
    for (int h = 1; h < 32; h *= 2)
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const float o = __shfl_xor_sync(0xffffffffu, t[k], h);
        if (h < nb[k]) t[k] = (lane & h) ? __fsub_rn(o, t[k]) : __fadd_rn(t[k], o);
      }
    register_butterflies(t, nb);
#pragma unroll
    for (int k = 0; k < E; ++k) t[k] = __fmul_rn(t[k], sc[k]);
  };
  blocks();
  if (m.two_rounds) {
#pragma unroll
    for (int k = 0; k < E; ++k)
      if (lane + 32 * k < n) x[lane + 32 * k] = t[k];
    __syncwarp();
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int i = lane + 32 * k;
      if (i < n) t[k] = __fmul_rn(x[perm[i]], s2[i]);
    }
    __syncwarp();  // x is written again after this
    blocks();
  }
}

}  // namespace tq::cuda
