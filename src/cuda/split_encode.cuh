// Internal: the two steps of a channel-split record's encoding that the
// prefill append (split_append.cu) and the captured step (mse_step.cu)
// share -- the segments' norms from the canonical lane sums, and the packed
// record -- so that both write the CPU encoder's bytes (kernels_ref.cpp's
// norm tree, pack_ref's bit order). Include after mse_append_kernel.cuh
// (kHalfMax, float_to_half_bits).
#pragma once

#include <cstdint>

#include "cuda/kernels.hpp"

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
