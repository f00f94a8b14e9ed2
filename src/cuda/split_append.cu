// Quantize-append for channel-split tq-mse formats (turbo2.5, turbo3.5,
// turbo4-out, paper_mse-out's keys: quant::SplitQuantizer), bit-identical to
// the CPU encoder. Per vector: round each element to the layer's format (as
// KvCache::append does), gather the head's channels into [hi | lo], then for
// each of the two segments what MseQuantizer::encode_one does over its
// sub-vector: norm by the canonical 16-lane sum, the segment's rotation
// (split_rotation.cuh, any dim), codes by the CPU's binary search, packed
// little-endian into the sub-record, fp16 (or f32) norm after the codes.
//
// Correctness over speed: one block takes 4096 / dim vectors at a time in
// shared memory, one thread per element or per packed byte. Every float operation
// is an explicit round-to-nearest intrinsic (and the file is compiled with
// -fmad=false), as in mse_append_kernel.cuh.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/cuda_check.hpp"
#include "cuda/mse_append.hpp"
#include "cuda/mse_append_kernel.cuh"
#include "cuda/split_rotation.cuh"
#include "turboquant/error.hpp"

namespace tq::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kElems = 4096;   // elements per pass: 4096 / dim vectors
constexpr int kMaxDim = 256;
constexpr int kMaxRows = kElems / 64;

struct SplitAppendParams {
  const uint8_t* x;
  int dtype, round_to;
  int n_heads, dim;
  const AppendTile* tiles;
  int n_tiles;
  uint8_t* pool;
  size_t page_bytes, region_offset;
  int page_tokens, record_bytes;
  int* status;
  SplitFormat f;
};

// Element idx of the input, as a float rounded to the layer's format (the
// status flags of KvCache's refusals: NaN/Inf, beyond the f16 range).
__device__ __forceinline__ float load_rounded(const SplitAppendParams& p, size_t idx, int& st) {
  float a;
  if (p.dtype == int(DType::f32)) a = reinterpret_cast<const float*>(p.x)[idx];
  else if (p.dtype == int(DType::f16)) a = __half2float(reinterpret_cast<const __half*>(p.x)[idx]);
  else a = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[idx]);
  if (!isfinite(a)) {
    st |= kStatusNonFinite;
    return a;
  }
  if (p.round_to == int(DType::f16)) {
    if (fabsf(a) > kHalfMax) {
      st |= kStatusDenseOverflow;
      return a;
    }
    return __half2float(__ushort_as_half(static_cast<unsigned short>(float_to_half_bits(a))));
  }
  if (p.round_to == int(DType::bf16)) return round_bf16(a);
  return a;
}

__global__ void __launch_bounds__(kThreads) split_append_kernel(const __grid_constant__ SplitAppendParams p) {
  __shared__ float xs[kElems];
  __shared__ float tmp[kElems];
  __shared__ uint8_t codes[kElems];
  __shared__ float part[kMaxRows * 2 * 16];
  __shared__ float nrm[kMaxRows * 2];
  __shared__ int rstat[kMaxRows];
  const int D = p.dim, n0 = p.f.seg[0].dim;
  const int kRows = kElems / D;  // vectors per pass
  const int tid = threadIdx.x;

  for (int ti = blockIdx.x; ti < p.n_tiles; ti += gridDim.x) {
    const AppendTile t = p.tiles[ti];
    const int rows = int(t.n) * t.nh;
    for (int r0 = 0; r0 < rows; r0 += kRows) {
      const int nr = min(kRows, rows - r0);
      for (int r = tid; r < kRows; r += kThreads) rstat[r] = 0;
      __syncthreads();
      // 1. The head's channels in [seg 0 | seg 1] order, rounded.
      for (int idx = tid; idx < nr * D; idx += kThreads) {
        const int r = idx / D, j = idx % D, row = r0 + r;
        const int token = t.token0 + row / t.nh, head = t.h0 + row % t.nh;
        const int c = p.f.channels[size_t(head) * D + j];
        int st = 0;
        xs[r * D + j] = load_rounded(p, (size_t(token) * p.n_heads + head) * D + c, st);
        if (st) atomicOr(&rstat[r], st);
      }
      __syncthreads();
      // 2. Norms: 16 lane sums in index order, then the tree (kernels_ref.cpp).
      for (int idx = tid; idx < nr * 32; idx += kThreads) {
        const int r = idx / 32, s = (idx / 16) % 2, lane = idx % 16;
        const int base = s ? n0 : 0, n = p.f.seg[s].dim;
        float acc = 0.0f;
        for (int i = lane; i < n; i += 16) {
          const float v = xs[r * D + base + i];
          acc = __fadd_rn(acc, __fmul_rn(v, v));
        }
        part[idx] = acc;
      }
      __syncthreads();
      for (int x = tid; x < nr * 2; x += kThreads) {
        float* a = part + x * 16;
        for (int w = 8; w >= 1; w /= 2)
          for (int i = 0; i < w; ++i) a[i] = __fadd_rn(a[i], a[i + w]);
        if (!isfinite(a[0])) atomicOr(&rstat[x / 2], kStatusNonFinite);
        nrm[x] = __fsqrt_rn(a[0]);
      }
      __syncthreads();
      // 3. Each segment's rotation.
      for (int s = 0; s < 2; ++s) {
        const int base = s ? n0 : 0;
        SegmentRotator{p.f.seg[s].rot, xs + base, tmp + base, nr, D}.forward();
      }
      // 4. Codes: #{boundaries < y / norm}, by the CPU's binary search; a zero
      // (or non-finite) norm gives codes 0.
      for (int idx = tid; idx < nr * D; idx += kThreads) {
        const int r = idx / D, j = idx % D, s = j >= n0 ? 1 : 0;
        const SplitSegment& g = p.f.seg[s];
        const float norm = nrm[r * 2 + s];
        int lo = 0;
        if (norm != 0.0f && isfinite(norm)) {
          const float v = __fmul_rn(xs[r * D + j], __fdiv_rn(1.0f, norm));
          for (int step = 1 << (g.bits - 1); step >= 1; step /= 2)
            if (g.boundaries[lo + step - 1] < v) lo += step;
        }
        codes[r * D + j] = static_cast<uint8_t>(lo);
      }
      __syncthreads();
      // 5. Packed bytes (pack_ref: stream bit k is bit k % b of code k / b),
      // then the scale, straight into the page.
      // Bytes of the longer sub-record, codes and an f32 scale at most.
      const int nb = max(p.f.seg[0].code_bytes, p.f.seg[1].code_bytes) + 4;
      for (int idx = tid; idx < nr * 2 * nb; idx += kThreads) {
        const int r = idx / (2 * nb), s = (idx / nb) % 2, k = idx % nb;
        const SplitSegment& g = p.f.seg[s];
        const int scale_bytes = g.scale_f32 ? 4 : 2;
        if (k >= g.code_bytes + scale_bytes) continue;
        const int row = r0 + r, tl = row / t.nh, head = t.h0 + row % t.nh;
        uint8_t* rec = p.pool + size_t(t.page) * p.page_bytes + p.region_offset +
                       (size_t(head) * p.page_tokens + t.slot0 + tl) * p.record_bytes + g.offset;
        if (k < g.code_bytes) {
          const int b = g.bits, base = s ? n0 : 0;
          const int i0 = (8 * k) / b, i1 = min(g.dim - 1, (8 * k + 7) / b);
          unsigned v = 0;
          for (int i = i0; i <= i1; ++i) {
            const int sh = i * b - 8 * k;  // may be negative: the code started in the byte before
            const unsigned c = codes[r * D + base + i];
            v |= sh >= 0 ? c << sh : c >> (-sh);
          }
          rec[k] = static_cast<uint8_t>(v & 0xffu);
        } else {
          const float norm = nrm[r * 2 + s];
          const int sk = k - g.code_bytes;
          unsigned bits;
          if (g.scale_f32) {
            bits = __float_as_uint(norm);
          } else {
            if (!(norm <= kHalfMax) && isfinite(norm)) atomicOr(p.status, kStatusScaleOverflow);
            bits = float_to_half_bits(norm);
          }
          rec[k] = static_cast<uint8_t>((bits >> (8 * sk)) & 0xffu);
        }
      }
      for (int r = tid; r < nr; r += kThreads)
        if (rstat[r] != 0) atomicOr(p.status, rstat[r]);
      __syncthreads();
    }
  }
}

}  // namespace

void launch_split_append_tiles(const AppendLaunch& a, const SplitFormat& f, int dim, int record_bytes,
                               CUstream_st* stream) {
  if (a.n_tiles == 0) return;
  TQ_ASSERT(f.n_seg == 2 && dim <= kMaxDim && f.seg[0].dim + f.seg[1].dim == dim);
  SplitAppendParams p;
  p.x = static_cast<const uint8_t*>(a.x);
  p.dtype = int(a.dtype);
  p.round_to = int(a.round_to);
  p.n_heads = a.n_heads;
  p.dim = dim;
  p.tiles = a.tiles;
  p.n_tiles = a.n_tiles;
  p.pool = a.region.pool;
  p.page_bytes = a.region.page_bytes;
  p.region_offset = a.region.region_offset;
  p.page_tokens = a.region.page_tokens;
  p.record_bytes = record_bytes;
  p.status = a.status;
  p.f = f;
  TQ_ASSERT(dim >= 64 && kElems % dim == 0);
  const int grid = std::min(a.n_tiles, 8 * append_sm_count());
  split_append_kernel<<<grid, kThreads, 0, stream>>>(p);
  TQ_CUDA_CHECK_LAUNCH();
}

}  // namespace tq::cuda
