// Internal: what the prefill append (split_append.cu) and the captured step
// (mse_step.cu) share of a channel-split record's encoding -- the segments'
// norms from the canonical lane sums, an outlier split's codes in registers,
// and the packed record -- so that both write the CPU encoder's bytes
// (kernels_ref.cpp's norm tree, Rotation::forward, the binary search,
// pack_ref's bit order). Include after mse_append_kernel.cuh (kHalfMax,
// float_to_half_bits).
#pragma once

#include <cstdint>

#include "cuda/kernels.hpp"
#include "cuda/split_rotation.cuh"

namespace tq::cuda {

// The two segments' norms from lane sums (lanes 0-15: segment 0's 16 lane
// sums, 16-31: segment 1's) by the tree w = 8, 4, 2, 1 of kernels_ref.cpp.
__device__ __forceinline__ void segment_norms(float acc, int l16, float& norm0, float& norm1, int& st) {
#pragma unroll
  for (int w = 8; w >= 1; w /= 2) {
    const float o = __shfl_down_sync(0xffffffffu, acc, w);
    if (l16 < w) acc = __fadd_rn(acc, o);
  }
  norm0 = __fsqrt_rn(__shfl_sync(0xffffffffu, acc, 0));
  norm1 = __fsqrt_rn(__shfl_sync(0xffffffffu, acc, 16));
  if (!isfinite(norm0) || !isfinite(norm1)) st |= kStatusNonFinite;
}

// The codes of one vector of a split whose first segment has at most 32
// channels (the -out presets' outlier channels), by one warp, in registers:
// lane l holds element l of segment 0 in x0 and elements l + 32 k of segment
// 1 in x1, rounded. The norms by the canonical 16 lane sums (lanes 0-15
// segment 0, lanes 16-31 segment 1), each segment's signs and rotation
// (warp_rotate_regs; s1 / s2 / perm / meta as stage_split_rotation stages
// them, scratch: D floats of the warp's shared memory), then the codes by the
// CPU's binary search over each segment's boundaries (bnd0 / bnd1, shared
// memory) into codes[0 .. D) ([seg 0 | seg 1]; the caller's __syncwarp
// publishes them). A zero (or non-finite) norm gives codes 0.
template <int D>
__device__ __forceinline__ void outlier_encode(float (&x0)[1], float (&x1)[D / 32], int n0, int bits0, int bits1,
                                               const float* bnd0, const float* bnd1, const float* s1,
                                               const float* s2, const int* perm, const RotMeta (&meta)[2],
                                               float* scratch, uint8_t* codes, int lane, float& norm0,
                                               float& norm1, int& st) {
  constexpr int EL = D / 32;
  const int n1 = D - n0, l16 = lane & 15, hsel = lane >> 4;
  // Norms: lane sum l16 of a segment adds its elements l16 + 16 m in m
  // order (elements past the segment add +0: the sums are unchanged).
  float acc = 0.0f;
  const float o0 = __shfl_xor_sync(0xffffffffu, x0[0], 16);
  {  // segment 0 (lanes 0-15): m = 0 is this lane's element, m = 1 lane l16 + 16's
    const float v0 = hsel ? 0.0f : x0[0], v1 = hsel ? 0.0f : o0;
    acc = __fadd_rn(acc, __fmul_rn(v0, v0));
    if (n0 > 16) acc = hsel ? acc : __fadd_rn(acc, __fmul_rn(v1, v1));
  }
#pragma unroll
  for (int k = 0; k < EL; ++k) {  // segment 1 (lanes 16-31): m = 2k in lane l16, m = 2k + 1 in lane l16 + 16
    const float o = __shfl_xor_sync(0xffffffffu, x1[k], 16);
    if (hsel) {
      acc = __fadd_rn(acc, __fmul_rn(o, o));
      acc = __fadd_rn(acc, __fmul_rn(x1[k], x1[k]));
    }
  }
  segment_norms(acc, l16, norm0, norm1, st);
  // Each segment's rotation: its signs, then warp_rotate_regs.
  x0[0] = lane < n0 ? __fmul_rn(x0[0], s1[lane]) : 0.0f;
#pragma unroll
  for (int k = 0; k < EL; ++k)
    if (lane + 32 * k < n1) x1[k] = __fmul_rn(x1[k], s1[n0 + lane + 32 * k]);
  warp_rotate_regs(meta[0], n0, x0, scratch, s2, perm, lane);
  warp_rotate_regs(meta[1], n1, x1, scratch + n0, s2 + n0, perm + n0, lane);
  // Codes: #{boundaries < y / norm} by the CPU's binary search.
  const bool ok0 = norm0 != 0.0f && isfinite(norm0), ok1 = norm1 != 0.0f && isfinite(norm1);
  const float inv0 = ok0 ? __fdiv_rn(1.0f, norm0) : 0.0f, inv1 = ok1 ? __fdiv_rn(1.0f, norm1) : 0.0f;
  auto search = [&](const float* b, int bits, float v) {
    int lo = 0;
    for (int step = 1 << (bits - 1); step >= 1; step /= 2)
      if (b[lo + step - 1] < v) lo += step;
    return lo;
  };
  if (lane < n0) codes[lane] = static_cast<uint8_t>(ok0 ? search(bnd0, bits0, __fmul_rn(x0[0], inv0)) : 0);
#pragma unroll
  for (int k = 0; k < EL; ++k)
    if (lane + 32 * k < n1)
      codes[n0 + lane + 32 * k] = static_cast<uint8_t>(ok1 ? search(bnd1, bits1, __fmul_rn(x1[k], inv1)) : 0);
}

// The record at rec0 of split f: each segment's codes packed (pack_ref:
// stream bit k is bit k % b of code k / b), then its scale. codes: the
// vector's codes in [seg 0 | seg 1] order (shared memory, written before a
// __syncwarp); every lane of the warp takes part.
__device__ inline void write_split_record(uint8_t* rec0, const SplitFormat& f, const uint8_t* codes,
                                          float norm0, float norm1, int lane, int& st) {
  const int n0 = f.seg[0].dim;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const SplitSegment& g = f.seg[s];
    const int b = g.bits, base = s ? n0 : 0, total = g.code_bytes + (g.scale_f32 ? 4 : 2);
    const float norm = s ? norm1 : norm0;
    uint8_t* rec = rec0 + g.offset;
    for (int k = lane; k < total; k += 32) {
      if (k < g.code_bytes) {
        const int i0 = (8 * k) / b, i1 = min(g.dim - 1, (8 * k + 7) / b);
        unsigned v = 0;
        constexpr int kMaxCodes = 9;  // codes touching a byte, at most
#pragma unroll
        for (int u = 0; u < kMaxCodes; ++u) {
          const int i = i0 + u;
          if (i > i1) break;
          const int sh = i * b - 8 * k;  // negative: the code started in the byte before
          const unsigned c = codes[base + i];
          v |= sh >= 0 ? c << sh : c >> (-sh);
        }
        rec[k] = static_cast<uint8_t>(v & 0xffu);
      } else {
        unsigned bits;
        if (g.scale_f32) {
          bits = __float_as_uint(norm);
        } else {
          if (!(norm <= kHalfMax) && isfinite(norm)) st |= kStatusScaleOverflow;
          bits = float_to_half_bits(norm);
        }
        rec[k] = static_cast<uint8_t>((bits >> (8 * (k - g.code_bytes))) & 0xffu);
      }
    }
  }
}

}  // namespace tq::cuda
