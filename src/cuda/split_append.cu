// Quantize-append for channel-split tq-mse formats (turbo2.5, turbo3.5,
// turbo4-out, paper_mse-out's keys: quant::SplitQuantizer), bit-identical to
// the CPU encoder. Per vector: round each element to the layer's format (as
// KvCache::append does), gather the head's channels into [hi | lo], then for
// each of the two segments what MseQuantizer::encode_one does over its
// sub-vector: norm by the canonical 16-lane sum, the segment's rotation
// (split_rotation.cuh, any dim), codes by the CPU's binary search, packed
// little-endian into the sub-record, fp16 (or f32) norm after the codes.
//
// Four kernels. The general one (one warp a vector, in shared memory,
// lanes over its elements) takes any split; outlier_append_kernel the
// splits whose first segment has at most 32 channels (the -out presets:
// outlier channels, a second segment that is not a power of two), in
// registers. Splits in two halves with one-block rotations
// (turbo2.5, turbo3.5) take halves_lane_kernel at head_dim 64 / 128 / 256
// (one lane a half-vector, its elements in registers, as in the tq-mse
// kernel: 128K Llama tokens from bf16 0.51 ms for turbo2.5, ~3.9x one read
// of the input, against ~2.9x for the tq-mse kernel; Gemma's d 256 ~5.2x) and
// halves_append_kernel otherwise (one warp a vector in registers; other bit
// widths). Every float operation
// is an explicit round-to-nearest intrinsic (and the file is compiled with
// -fmad=false), as in mse_append_kernel.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "cuda/cuda_check.hpp"
#include "cuda/fwht_registers.cuh"
#include "cuda/mse_append.hpp"
#include "cuda/mse_append_kernel.cuh"
#include "cuda/split_encode.cuh"
#include "cuda/split_rotation.cuh"
#include "turboquant/error.hpp"

namespace tq::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxDim = 256;

struct SplitAppendParams {
  const uint8_t* x;
  int dtype, round_to;
  int n_heads, dim;
  const AppendTile* tiles;
  AppendStepTiles step;  // step.seqs set: tiles computed (append_tile_at)
  int n_tiles;
  uint8_t* pool;
  size_t page_bytes, region_offset;
  int page_tokens, record_bytes;
  int* status;
  SplitFormat f;
};

// An input value rounded to the layer's format (the status flags of
// KvCache's refusals: NaN/Inf, beyond the f16 range).
__device__ __forceinline__ float round_checked(const SplitAppendParams& p, float a, int& st) {
  if (!isfinite(a)) {
    st |= kStatusNonFinite;
    return a;
  }
  if (p.round_to == int(DType::f16)) {
    if (fabsf(a) > kHalfMax) {
      st |= kStatusDenseOverflow;
      return a;
    }
    // half_to_float(float_to_half(a)) without the integer conversion routine.
    return fabsf(a) < kHalfMinNormal ? round_f16_subnormal(a) : round_f16_normal(a);
  }
  if (p.round_to == int(DType::bf16)) return round_bf16(a);
  return a;
}
// Element idx of the input, rounded (round_checked).
__device__ __forceinline__ float load_rounded(const SplitAppendParams& p, size_t idx, int& st) {
  float a;
  if (p.dtype == int(DType::f32)) a = reinterpret_cast<const float*>(p.x)[idx];
  else if (p.dtype == int(DType::f16)) a = __half2float(reinterpret_cast<const __half*>(p.x)[idx]);
  else a = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[idx]);
  return round_checked(p, a, st);
}
// load_rounded for input type T (the caller dispatched on p.dtype).
template <typename T>
__device__ __forceinline__ float load_rounded_t(const SplitAppendParams& p, size_t idx, int& st) {
  float a;
  if constexpr (std::is_same_v<T, float>) a = reinterpret_cast<const float*>(p.x)[idx];
  else if constexpr (std::is_same_v<T, __half>) a = __half2float(reinterpret_cast<const __half*>(p.x)[idx]);
  else a = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.x)[idx]);
  return round_checked(p, a, st);
}
// One segment's rotation by one warp on its vector in shared memory
// (Rotation::forward, operation for operation; see split_rotation.cuh).
__device__ __forceinline__ void warp_hadamard_blocks(float* x, const SegmentRotation& R, int lane) {
  int off = 0;
  for (int b = 0; b < R.n_blocks; ++b) {
    const int n = R.blocks[b], ln = __ffs(n) - 1;
    for (int lh = 0; lh < ln; ++lh) {
      const int h = 1 << lh;
      for (int q = lane; q < n / 2; q += 32) {
        const int j = off + ((q >> lh) << (lh + 1)) + (q & (h - 1));
        const float a = x[j], c = x[j + h];
        x[j] = __fadd_rn(a, c);
        x[j + h] = __fsub_rn(a, c);
      }
      __syncwarp();
    }
    const float sc = R.block_scale[b];
    for (int i = lane; i < n; i += 32) x[off + i] = __fmul_rn(x[off + i], sc);
    __syncwarp();
    off += n;
  }
}
__device__ void warp_rotate(float* x, float* tmp, const SegmentRotation& R, int lane) {
  for (int i = lane; i < R.dim; i += 32) x[i] = __fmul_rn(x[i], R.signs1[i]);
  __syncwarp();
  warp_hadamard_blocks(x, R, lane);
  if (R.perm != nullptr) {
    for (int i = lane; i < R.dim; i += 32) tmp[i] = x[i];
    __syncwarp();
    for (int i = lane; i < R.dim; i += 32) x[i] = __fmul_rn(tmp[R.perm[i]], R.signs2[i]);
    __syncwarp();
    warp_hadamard_blocks(x, R, lane);
  }
}

// Row `row` of tile t (token-major: row / nh is the token, row % nh the head):
// its token in the tile, head, the head's channel order and where its input starts.
struct Row {
  int tl, head;
  const int* ch;
  size_t base_in;
};
__device__ __forceinline__ Row row_at(const SplitAppendParams& p, const AppendTile& t, int row, int dim) {
  Row r;
  r.tl = row / t.nh;
  r.head = t.h0 + row % t.nh;
  r.ch = p.f.channels + size_t(r.head) * dim;
  r.base_in = (size_t(t.token0 + r.tl) * p.n_heads + r.head) * dim;
  return r;
}

// Calls f(tile, row) for the rows warp `warp` of n_warps takes: rows warp,
// warp + n_warps, .. of each of the block's tiles (blocks stride the tiles).
template <class F>
__device__ __forceinline__ void for_each_row(const SplitAppendParams& p, int warp, int n_warps, int dim, F&& f) {
  for (int ti = blockIdx.x; ti < p.n_tiles; ti += gridDim.x) {
    const AppendTile t = append_tile_at(p.tiles, p.step, ti);
    const int rows = int(t.n) * t.nh;
    for (int row = warp; row < rows; row += n_warps) f(t, row_at(p, t, row, dim));
  }
}

// Where the record of row (tile t, token tl, head) goes.
__device__ __forceinline__ uint8_t* record_at(const SplitAppendParams& p, const AppendTile& t, int tl, int head) {
  return p.pool + size_t(t.page) * p.page_bytes + p.region_offset +
         (size_t(head) * p.page_tokens + t.slot0 + tl) * p.record_bytes;
}
// The record of row (tile t, token tl, head) (write_split_record).
__device__ void write_record(const SplitAppendParams& p, const AppendTile& t, int tl, int head,
                             const uint8_t* codes, float norm0, float norm1, int lane, int& st) {
  write_split_record(record_at(p, t, tl, head), p.f, codes, norm0, norm1, lane, st);
}

// One warp per vector: its rows of the tile, each through the whole
// pipeline with warp-level synchronisation only.
__global__ void __launch_bounds__(kThreads) split_append_kernel(const __grid_constant__ SplitAppendParams p) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float xs_all[kWarps][kMaxDim];
  __shared__ float tmp_all[kWarps][kMaxDim];
  __shared__ uint8_t codes_all[kWarps][kMaxDim];
  // Warp-uniform through a shuffle (see halves_append_kernel).
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x / 32), 0), lane = threadIdx.x % 32;
  float* xs = xs_all[warp];
  float* tmp = tmp_all[warp];
  uint8_t* codes = codes_all[warp];
  const int D = p.dim, n0 = p.f.seg[0].dim;

  for_each_row(p, warp, kWarps, D, [&](const AppendTile& t, const Row& rw) {
    // 1. The head's channels in [seg 0 | seg 1] order, rounded.
    int st = 0;
    for (int j = lane; j < D; j += 32) xs[j] = load_rounded(p, rw.base_in + rw.ch[j], st);
    __syncwarp();
    // 2. Norms: lanes 0-15 segment 0, 16-31 segment 1; lane sums in index
    // order, then the tree w = 8, 4, 2, 1 (kernels_ref.cpp).
    const int s_me = lane >> 4, l16 = lane & 15;
    const int base_me = s_me ? n0 : 0, n_me = p.f.seg[s_me].dim;
    float acc = 0.0f;
    for (int i = l16; i < n_me; i += 16) acc = __fadd_rn(acc, __fmul_rn(xs[base_me + i], xs[base_me + i]));
    float norm0, norm1;
    segment_norms(acc, l16, norm0, norm1, st);
    // 3. Each segment's rotation.
    warp_rotate(xs, tmp, p.f.seg[0].rot, lane);
    warp_rotate(xs + n0, tmp + n0, p.f.seg[1].rot, lane);
    // 4. Codes: #{boundaries < y / norm} by the CPU's binary search; a zero
    // (or non-finite) norm gives codes 0.
    for (int j = lane; j < D; j += 32) {
      const int s = j >= n0 ? 1 : 0;
      const SplitSegment& g = p.f.seg[s];
      const float norm = s ? norm1 : norm0;
      int lo = 0;
      if (norm != 0.0f && isfinite(norm)) {
        const float v = __fmul_rn(xs[j], __fdiv_rn(1.0f, norm));
        for (int step = 1 << (g.bits - 1); step >= 1; step /= 2)
          if (g.boundaries[lo + step - 1] < v) lo += step;
      }
      codes[j] = static_cast<uint8_t>(lo);
    }
    __syncwarp();
    // 5. Packed bytes and scales, straight into the page.
    write_record(p, t, rw.tl, rw.head, codes, norm0, norm1, lane, st);
    if (st) atomicOr(p.status, st);
    __syncwarp();  // the buffers are read: the next row may overwrite them
  });
  append_step_block_done(p.step, append_tiles_of_block(p.n_tiles), 2 * p.n_tiles, p.status);
}

// Splits in two halves of D/2 channels with one-block rotations (turbo2.5,
// turbo3.5): one warp per vector as above, but in registers -- lane l holds
// elements l + 32 r of [seg 0 | seg 1] (a half is D/64 whole registers), the
// Hadamard stages of stride 1..16 go by shuffles and the wider ones inside
// the registers, in the CPU's order (ascending strides), and the norms
// follow the canonical 16-lane order by one exchange of the lane halves.
// Only the packing goes through shared memory. (turbo2.5 / turbo3.5 take
// halves_lane_kernel; this kernel the other bit widths, read from the format.)
template <int D>
__global__ void __launch_bounds__(kThreads) halves_append_kernel(const __grid_constant__ SplitAppendParams p) {
  constexpr int kWarps = kThreads / 32, R = D / 32, RH = D / 64;  // registers a lane, a half
  __shared__ uint8_t codes_all[kWarps][D];
  __shared__ float bnd[2][256];  // each segment's boundaries
  for (int s = 0; s < 2; ++s)
    for (int i = threadIdx.x; i < (1 << p.f.seg[s].bits) - 1; i += kThreads) bnd[s][i] = p.f.seg[s].boundaries[i];
  __syncthreads();
  // The warp index through a shuffle from lane 0: the compiler then knows the
  // row loop is warp-uniform and the shuffles below need no divergence path.
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x / 32), 0), lane = threadIdx.x % 32;
  const int l16 = lane & 15, hsel = lane >> 4;
  uint8_t* codes = codes_all[warp];
  const float scale0 = p.f.seg[0].rot.block_scale[0], scale1 = p.f.seg[1].rot.block_scale[0];
  const int bits0 = p.f.seg[0].bits, bits1 = p.f.seg[1].bits;

  for_each_row(p, warp, kWarps, D, [&](const AppendTile& t, const Row& rw) {
    // 1. The head's channels in [seg 0 | seg 1] order, rounded.
    int st = 0;
    float x[R];
#pragma unroll
    for (int r = 0; r < R; ++r) x[r] = load_rounded(p, rw.base_in + __ldg(rw.ch + lane + 32 * r), st);
    // 2. Norms: segment h's lane sum l16 adds its elements l16 + 16 m in m
    // order, i.e. alternately lane l16's and lane l16 + 16's registers:
    // lanes 0-15 sum segment 0, lanes 16-31 segment 1, then the tree
    // w = 8, 4, 2, 1 (kernels_ref.cpp).
    float acc = 0.0f;
#pragma unroll
    for (int m = 0; m < R; ++m) {
      const float mine = hsel ? x[RH + (m >> 1)] : x[m >> 1];
      const float other = __shfl_xor_sync(0xffffffffu, hsel ? x[m >> 1] : x[RH + (m >> 1)], 16);
      // m even: the element is in lane l16 (lanes 0-15 own it); odd: lane l16 + 16.
      const float v = ((m & 1) ^ hsel) ? other : mine;
      acc = __fadd_rn(acc, __fmul_rn(v, v));
    }
    float norm0, norm1;
    segment_norms(acc, l16, norm0, norm1, st);
    // 3. Each half's rotation: signs, butterflies of stride 1 .. D/4, its scale.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int h = r / RH;
      x[r] = __fmul_rn(x[r], __ldg(p.f.seg[h].rot.signs1 + lane + 32 * (r - h * RH)));
    }
#pragma unroll
    for (int sh = 1; sh < 32; sh *= 2)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float o = __shfl_xor_sync(0xffffffffu, x[r], sh);
        x[r] = (lane & sh) ? __fsub_rn(o, x[r]) : __fadd_rn(x[r], o);
      }
    fwht_register_blocks<RH>(x);  // strides 32, 64, .. inside each half (a lone add is never fused)
    // 4. Codes: #{boundaries < y / norm} by the CPU's binary search; a zero
    // (or non-finite) norm gives codes 0. (1 / norm once a half: the same
    // correctly rounded quotient the CPU takes per element.)
    const bool ok0 = norm0 != 0.0f && isfinite(norm0), ok1 = norm1 != 0.0f && isfinite(norm1);
    const float inv0 = ok0 ? __fdiv_rn(1.0f, norm0) : 0.0f, inv1 = ok1 ? __fdiv_rn(1.0f, norm1) : 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int h = r / RH;
      const float y = __fmul_rn(x[r], h ? scale1 : scale0);
      int lo = 0;
      if (h ? ok1 : ok0) {
        const float v = __fmul_rn(y, h ? inv1 : inv0);
#pragma unroll
        for (int step = 1 << ((h ? bits1 : bits0) - 1); step >= 1; step /= 2)
          if (bnd[h][lo + step - 1] < v) lo += step;
      }
      codes[lane + 32 * r] = static_cast<uint8_t>(lo);
    }
    __syncwarp();
    // 5. Packed bytes and scales, straight into the page.
    write_record(p, t, rw.tl, rw.head, codes, norm0, norm1, lane, st);
    if (st) atomicOr(p.status, st);
    __syncwarp();  // the codes are read: the next row may overwrite them
  });
  append_step_block_done(p.step, append_tiles_of_block(p.n_tiles), 2 * p.n_tiles, p.status);
}

// Splits whose first segment has at most 32 channels (the -out presets'
// outlier channels: head_dim / 8 of them; any rotation, two-round ones
// included): one warp a vector as halves_append_kernel, in registers --
// lane l holds element l of segment 0 and elements l + 32 k of segment 1,
// so that each segment starts at lane 0 -- the norms by the canonical 16
// lane sums (lanes 0-15 segment 0, lanes 16-31 segment 1), each segment's
// rotation by outlier_rotate (SegmentRotator::forward's operations; its
// parameters staged in shared memory once a block), the CPU's binary search
// over boundaries in shared memory. Only the packing goes through shared
// memory (write_record). The general kernel above took everything through
// shared memory and global loads: 128K Llama tokens of turbo4-out keys from
// bf16 4.29 ms.
template <int D>
__global__ void __launch_bounds__(kThreads) outlier_append_kernel(const __grid_constant__ SplitAppendParams p) {
  constexpr int kWarps = kThreads / 32, EL = D / 32;  // segment 1's registers a lane (at most)
  __shared__ uint8_t codes_all[kWarps][D];
  __shared__ float scratch_all[kWarps][D];  // the permutations
  __shared__ float bnd[2][256];             // each segment's boundaries
  __shared__ OutlierElem elems[D];          // the rotations' per-element parameters
  const int n0 = p.f.seg[0].dim, n1 = D - n0;
  for (int sg = 0; sg < 2; ++sg)
    for (int i = threadIdx.x; i < (1 << p.f.seg[sg].bits) - 1; i += kThreads) bnd[sg][i] = p.f.seg[sg].boundaries[i];
  stage_outlier_elems(p.f, n0, D, elems);
  __syncthreads();
  const bool two0 = p.f.seg[0].rot.perm != nullptr, two1 = p.f.seg[1].rot.perm != nullptr;
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x / 32), 0), lane = threadIdx.x % 32;
  uint8_t* codes = codes_all[warp];
  float* scratch = scratch_all[warp];
  const int bits0 = p.f.seg[0].bits, bits1 = p.f.seg[1].bits;

  for_each_row(p, warp, kWarps, D, [&](const AppendTile& t, const Row& rw) {
    // 1. The head's channels, rounded: segment 0's element `lane`, segment 1's lane + 32 k.
    int st = 0;
    float x0[1] = {lane < n0 ? load_rounded(p, rw.base_in + __ldg(rw.ch + lane), st) : 0.0f};
    float x1[EL];
#pragma unroll
    for (int k = 0; k < EL; ++k)
      x1[k] = lane + 32 * k < n1 ? load_rounded(p, rw.base_in + __ldg(rw.ch + n0 + lane + 32 * k), st) : 0.0f;
    // 2-4. Norms, each segment's rotation, codes (outlier_encode).
    float norm0, norm1;
    outlier_encode<D>(x0, x1, n0, bits0, bits1, bnd[0], bnd[1], elems, two0, two1, scratch, codes, lane, norm0,
                      norm1, st);
    __syncwarp();
    // 5. Packed bytes and scales, straight into the page.
    write_record(p, t, rw.tl, rw.head, codes, norm0, norm1, lane, st);
    if (st) atomicOr(p.status, st);
    __syncwarp();  // the codes are read: the next row may overwrite them
  });
  append_step_block_done(p.step, append_tiles_of_block(p.n_tiles), 2 * p.n_tiles, p.status);
}

// The -out presets themselves (the OutlierStd layout at head_dim 128 / 256,
// segment widths B0 / B1): outlier_append_kernel's work with the rotation's
// extents, the searches and the packing unrolled (outlier_encode_std,
// write_outlier_record_std): 128K Llama tokens of turbo4-out keys from bf16
// took ~2.4 ms in outlier_append_kernel (~2,000 warp instructions a vector,
// issue-bound).
template <int D, int B0, int B1, typename T>
__global__ void __launch_bounds__(kThreads, 4) outlier_std_kernel(const __grid_constant__ SplitAppendParams p) {
  constexpr int kWarps = kThreads / 32, EL = D / 32;
  using L = OutlierStd<D>;
  __shared__ __align__(16) uint8_t codes_all[kWarps][D];
  __shared__ float scratch_all[kWarps][D];  // the permutation
  __shared__ float bnd[2][1 << B0];         // each segment's boundaries
  __shared__ OutlierElem elems[D];          // the rotations' per-element parameters
  static_assert(B1 <= B0);
  for (int sg = 0; sg < 2; ++sg)
    for (int i = threadIdx.x; i < (1 << (sg ? B1 : B0)) - 1; i += kThreads) bnd[sg][i] = p.f.seg[sg].boundaries[i];
  stage_outlier_elems(p.f, L::kN0, D, elems);
  __syncthreads();
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x / 32), 0), lane = threadIdx.x % 32;
  uint8_t* codes = codes_all[warp];
  float* scratch = scratch_all[warp];
  float sg[5];
#pragma unroll
  for (int j = 0; j < 5; ++j) sg[j] = (lane >> j) & 1 ? -1.0f : 1.0f;

  for_each_row(p, warp, kWarps, D, [&](const AppendTile& t, const Row& rw) {
    int st = 0;
    float x0[1] = {lane < L::kN0 ? load_rounded_t<T>(p, rw.base_in + __ldg(rw.ch + lane), st) : 0.0f};
    float x1[EL];
#pragma unroll
    for (int k = 0; k < EL; ++k)
      x1[k] = lane + 32 * k < L::kN1 ? load_rounded_t<T>(p, rw.base_in + __ldg(rw.ch + L::kN0 + lane + 32 * k), st)
                                     : 0.0f;
    float norm0, norm1;
    outlier_encode_std<D, B0, B1>(x0, x1, bnd[0], bnd[1], elems, p.f.seg[0].rot, p.f.seg[1].rot, sg, scratch, codes,
                                  lane, norm0, norm1, st);
    __syncwarp();
    write_outlier_record_std<D, B0, B1>(record_at(p, t, rw.tl, rw.head), p.f, codes, norm0, norm1, lane, st);
    if (st) atomicOr(p.status, st);
    __syncwarp();  // the codes are read: the next row may overwrite them
  });
  append_step_block_done(p.step, append_tiles_of_block(p.n_tiles), 2 * p.n_tiles, p.status);
}

// Splits in two halves at B0 and B0 - 1 bits (turbo2.5: 3/2, turbo3.5: 4/3),
// head_dim 64, 128 or 256, input type T: one lane a half-vector, its D/2
// elements in registers, so that a half's fixed work (norm, division,
// scale, packing) is paid once per D/2 elements instead of once per 4
// (halves_append_kernel). The first half of the block's warps takes the hi
// halves of the tile's rows, the second the lo halves: a warp's bits are
// uniform, so that each lane searches and packs at its own width only
// (pack_half: boundaries in registers up to 3 bits, the tq-mse kernel's
// 32-cell table at 4). A tile's input rows arrive in shared
// memory by cp.async (all in flight at once); each lane takes its half's
// channels (gathered, below) and rounds them, takes the norm (the canonical
// 16 partial sums) and the rotation in registers. The records are staged
// and go out per head as contiguous runs, as the tq-mse kernel's do.
// The gather is its own pass over the tile (gather_halves): a thread takes
// two adjacent channel slots of one head's half, loads their source columns
// once and copies them for every token of the tile, sign-flipped by the
// half's rotation signs, into contiguous half-vectors that the lanes then
// read 16 bytes at a time; the rows are then free, so the next tile's rows
// load during this one's work (without costing shared memory: a second row
// buffer measured no faster when the lanes' work was heavier).
// (Gathering inside the lanes cost two L1 loads an element, the column and
// the sign, for every vector. With that, a binary search through shared
// memory and per-element rounding branches the kernel took 1.10 ms for 128K
// Llama tokens from bf16; 0.51 ms now.)
template <int D>
struct LaneRows {
  static constexpr int kRows = append_rows_per_tile(D);  // rows of a tile (tiles are cut for the tq-mse kernel)
};
// The raw bits of an input element and its sign bit.
template <typename T>
struct ElemBits {
  using U = uint16_t;
  static constexpr U kSign = 0x8000u;
};
template <>
struct ElemBits<float> {
  using U = uint32_t;
  static constexpr U kSign = 0x80000000u;
};
// Half-vector pitch in the gathered area: N elements and 16 bytes, so that
// the lanes' 16-byte reads of consecutive half-vectors hit different banks.
template <int D, typename T>
__host__ __device__ constexpr int half_pitch() {
  return D / 2 * int(sizeof(T)) + 16;
}

// An input element's bits (sign already flipped) as the 16-bit S, rounded
// as round_checked rounds (f32 input), its flags in st.
template <typename T, typename S>
__device__ __forceinline__ typename ElemBits<S>::U to_half_bits(typename ElemBits<T>::U v, int& st) {
  using US = typename ElemBits<S>::U;
  if constexpr (std::is_same_v<T, S>) {
    return v;
  } else if constexpr (std::is_same_v<S, __half>) {  // f32 -> the f16 grid
    const unsigned ax = v & 0x7fffffffu;
    if (ax >= 0x38800000u && ax <= 0x477fe000u) {  // 2^-14 <= |x| <= 65504: round_f16_normal's bits
      const unsigned r = (v + 0xfffu + ((v >> 13) & 1u)) & 0xffffe000u;
      return US(((r >> 16) & 0x8000u) | (((r & 0x7fffffffu) >> 13) - 0x1c000u));
    }
    if (ax >= 0x7f800000u) st |= kStatusNonFinite;
    else if (ax > 0x477fe000u) st |= kStatusDenseOverflow;
    return US(float_to_half_bits(__uint_as_float(v)));  // subnormal halves (refused values: any)
  } else {  // f32 -> bf16
    const float a = __uint_as_float(v);
    if (!isfinite(a)) st |= kStatusNonFinite;
    return isnan(a) ? US((v >> 16) | 0x40u) : US(__float_as_uint(round_bf16(a)) >> 16);
  }
}

// The tile's rows (in: [rows][pitch] as copied, type T) gathered into
// half-vectors hv: [2][kRows][half_pitch] of S (the hi halves, then the lo
// ones: a warp's lanes read consecutive half-vectors) in channel order: element j of
// half hh of row r is in[r][channels[h][hh * N + j]] with its sign bit
// flipped where the half's signs1[j] is -1. Flipping before rounding, norm
// and rotation gives the CPU's bits: rounding is symmetric, the norm
// squares, and the CPU's x * signs1 is that same exact negation. f32 input
// (S: the layer's 16-bit format) is rounded here, as round_checked rounds
// and with its flags in st, so that the lanes read 16-bit halves as for
// 16-bit input.
template <int D, typename T, typename S, int kRows, int kThreadsL>
__device__ __forceinline__ void gather_halves(const SplitAppendParams& p, const AppendTile& t, const uint8_t* in,
                                              int pitch, uint8_t* hv, int& st) {
  using UT = typename ElemBits<T>::U;
  static_assert(sizeof(S) == 2, "gathered halves are 16-bit");
  constexpr int N = D / 2, kHP = half_pitch<D, S>(), kPairs = D / 2;  // element pairs of a row
  const int n = t.n, nh = t.nh, sstep = nh * pitch, dstep = nh * kHP;
  // A thread takes two adjacent elements j, j + 1 of one half (one 32-bit
  // store a token) and walks the tile's tokens by pointer steps.
  for (int idx = threadIdx.x; idx < nh * kPairs; idx += kThreadsL) {
    const int hl = idx / kPairs, e = 2 * (idx % kPairs), hh = e / N, j = e % N;
    const int* ch = p.f.channels + size_t(t.h0 + hl) * D + e;
    const float* sg = p.f.seg[hh].rot.signs1 + j;
    const UT f0 = __ldg(sg) < 0.0f ? ElemBits<T>::kSign : UT(0);
    const UT f1 = __ldg(sg + 1) < 0.0f ? ElemBits<T>::kSign : UT(0);
    const uint8_t* s0 = in + hl * pitch + __ldg(ch) * int(sizeof(T));
    const uint8_t* s1 = in + hl * pitch + __ldg(ch + 1) * int(sizeof(T));
    uint8_t* dst = hv + (hh * kRows + hl) * kHP + j * 2;
    for (int tl = 0; tl < n; ++tl) {
      unsigned w;
      if constexpr (std::is_same_v<T, S>) {  // one xor flips both signs
        w = (unsigned(*reinterpret_cast<const UT*>(s0)) | (unsigned(*reinterpret_cast<const UT*>(s1)) << 16)) ^
            (unsigned(f0) | (unsigned(f1) << 16));
      } else {
        const unsigned o0 = to_half_bits<T, S>(UT(*reinterpret_cast<const UT*>(s0) ^ f0), st);
        const unsigned o1 = to_half_bits<T, S>(UT(*reinterpret_cast<const UT*>(s1) ^ f1), st);
        w = o0 | (o1 << 16);
      }
      *reinterpret_cast<unsigned*>(dst) = w;
      s0 += sstep;
      s1 += sstep;
      dst += dstep;
    }
  }
}
// A gathered half-vector of 16-bit input (N values), rounded to the layer's
// format as round_checked rounds, without its per-element branches: bf16 is
// exact in f16 but below 2^-14 (subnormal halves: a rare fix, taken when the
// vector's smallest |x| is there, zeros included) and above 65504 (refused:
// found from the norm, see halves_lane_kernel); f16 in bf16 rounds each
// value, a NaN staying a NaN; every other pair is exact. (The tq-mse kernel
// does the same.)
template <int N, typename T>
__device__ __forceinline__ void load_gathered16(const SplitAppendParams& p, const uint4* q, float (&x)[N]) {
  static_assert(sizeof(T) == 2 && N % 8 == 0);
  unsigned raw[N / 2];
  load_words16<N / 2>(q, raw);
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const bool tiny = kBf16 && p.round_to == int(DType::f16) && bf16_pairs_below_f16_normal<N / 2>(raw);
  auto convert = [&](bool fix) {
#pragma unroll
    for (int j = 0; j < N / 2; ++j) pair_to_floats<kBf16>(raw[j], fix, x[2 * j], x[2 * j + 1]);
  };
  if (tiny) convert(true);
  else convert(false);
  if (!kBf16 && p.round_to == int(DType::bf16)) {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (!isnan(x[j])) x[j] = round_bf16(x[j]);
  }
}

// The codes of one half at BITS bits (= the CPU's binary search over v =
// fl(fl(y * scale) * (1 / norm))), packed as pack_ref packs them, into rec
// (valid rows); ok false (zero or non-finite norm): codes 0. Up to 3 bits
// the boundaries sit in registers: the search's first step, then the count
// of boundaries below v in the half it chose (lt01) -- ALU work only, which
// at these widths costs no more than the table; 4 bits take the tq-mse
// kernel's 32-cell table (a cell per lane of the warp, read by shuffles:
// the half is warp-uniform).
template <int N, int BITS>
__device__ __forceinline__ void pack_half(const float* x, float scale, float inv, bool ok, const SearchTable& tab,
                                          const float* boundaries, int lane, bool valid, uint8_t* rec) {
  constexpr int W = N * BITS / 32;
  unsigned w[W];
  if constexpr (BITS <= 3) {
    constexpr int kMid = 1 << (BITS - 1);
    float b[2 * kMid - 1];  // -0 as +0 (lt01 needs that)
#pragma unroll
    for (int k = 0; k < 2 * kMid - 1; ++k) b[k] = __fadd_rn(__ldg(boundaries + k), 0.0f);
#pragma unroll
    for (int k = 0; k < W; ++k) w[k] = 0;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float v = __fmul_rn(__fmul_rn(x[j], scale), inv);
      const bool up = b[kMid - 1] < v;
      unsigned c = up ? unsigned(kMid) : 0u;
#pragma unroll
      for (int k = 0; k < kMid - 1; ++k) c += lt01(up ? b[kMid + k] : b[k], v);
      const int pos = j * BITS;
      w[pos / 32] |= c << (pos % 32);
      if (pos % 32 + BITS > 32) w[pos / 32 + 1] |= c >> (32 - pos % 32);
    }
  } else {
    quantize_pack<BITS, int(AppendSearch::table1), N>(x, scale, inv, tab.cell_scale, tab.b0[lane], 0.0f,
                                                      tab.base[lane], nullptr, w);
  }
  const unsigned keep = ok ? ~0u : 0u;
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] &= keep;
  if (valid) store_words_u16<W>(rec, w);
}

template <int D, int B0, typename T, typename S>
__global__ void __launch_bounds__(2 * LaneRows<D>::kRows, 2)
    halves_lane_kernel(const __grid_constant__ SplitAppendParams p, int out_offset,
                       const __grid_constant__ SplitSearch tabs) {
  constexpr int N = D / 2, kRows = LaneRows<D>::kRows, kThreadsL = 2 * kRows, kWarpsL = kThreadsL / 32;
  constexpr int kRowBytes = D * int(sizeof(T)), kPitch = kRowBytes + 16, kChunks = kRowBytes / 16;
  static_assert(D == 64 || D == 128 || D == 256, "two halves of 32, 64 or 128 elements a lane");
  static_assert(kRows % 32 == 0, "each warp takes one half");
  extern __shared__ __align__(16) uint8_t smem[];
  // S: the type the gather pass stores, the input's or (f32 input) the
  // layer's 16-bit format. f32 input kept as f32 (layers of f32 format:
  // a gathered copy would halve the resident blocks) is gathered in place.
  constexpr bool kGather = sizeof(S) == 2;
  constexpr int kHP = half_pitch<D, S>();
  uint8_t* const in = smem;                   // [kRows][kPitch] input rows
  uint8_t* const hv = smem + kRows * kPitch;  // kGather: [2][kRows][kHP] gathered halves
  uint8_t* const out_stage = smem + out_offset;
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x / 32), 0), lane = threadIdx.x % 32;
  // Row of the tile and half: the first kRows threads take the hi halves,
  // the others the lo ones, so that a warp's half (its bits, its table) is
  // uniform. (Through the warp index: known uniform to the compiler.)
  const int half = warp >= kWarpsL / 2 ? 1 : 0, rl = threadIdx.x - half * kRows;
  const SplitSegment& g = p.f.seg[half];
  const float scale = g.rot.block_scale[0];
  const int rb = p.record_bytes;

  // A tile's input rows into shared memory, every copy in flight at once.
  auto issue_rows = [&](const AppendTile& t) {
    const int nh = t.nh, rows = int(t.n) * nh;
    for (int i = threadIdx.x; i < rows * kChunks; i += kThreadsL) {
      const int r = i / kChunks, k = i % kChunks;
      const size_t row = size_t(t.token0 + r / nh) * p.n_heads + t.h0 + r % nh;
      cp_async16(in + r * kPitch + 16 * k, p.x + row * kRowBytes + 16 * k);
    }
    cp_async_commit();
  };
  // Gathered input: the rows are free once gathered, so the next tile's
  // rows load while this one computes; f32 rows are read in place.
  if (kGather && blockIdx.x < p.n_tiles) issue_rows(append_tile_at(p.tiles, p.step, blockIdx.x));
  for (int ti = blockIdx.x; ti < p.n_tiles; ti += gridDim.x) {
    const AppendTile t = append_tile_at(p.tiles, p.step, ti);
    const int n = t.n, nh = t.nh, rows = n * nh;
    int st = 0;
    __syncthreads();  // the previous tile's rows and records are consumed
    // 1. The tile's input rows (issued a tile ahead where gathered).
    if (!kGather) issue_rows(t);
    cp_async_wait_all();
    __syncthreads();
    if constexpr (kGather) {
      gather_halves<D, T, S, kRows, kThreadsL>(p, t, in, kPitch, hv, st);
      __syncthreads();
      if (ti + int(gridDim.x) < p.n_tiles) issue_rows(append_tile_at(p.tiles, p.step, ti + gridDim.x));
    }
    const int run_stride = (n * rb + 31) & ~15;
    auto dest = [&](int h) {  // first record of head h of the tile
      return p.pool + size_t(t.page) * p.page_bytes + p.region_offset +
             (size_t(t.h0 + h) * p.page_tokens + t.slot0) * rb;
    };
    // Every lane computes (the shuffles of the search need the whole warp);
    // rows past the tile's read stale shared memory and store nothing.
    const bool valid = rl < rows;
    int sl = 0;  // this row's flags (st holds the gather pass's)
    const int tl = valid ? rl / nh : 0, hl = valid ? rl % nh : 0;
    // 2. This half's channels (gathered, signs applied), rounded; its norm
    // from the 16 partial sums.
    float x[N];
    if constexpr (kGather) {
      load_gathered16<N, S>(p, reinterpret_cast<const uint4*>(hv + (half * kRows + rl) * kHP), x);
    } else {
      const int* ch = p.f.channels + size_t(t.h0 + hl) * D + half * N;
      const float* row = reinterpret_cast<const float*>(in + rl * kPitch);
#pragma unroll
      for (int j = 0; j < N; ++j) x[j] = __fmul_rn(round_checked(p, row[__ldg(ch + j)], sl), __ldg(g.rot.signs1 + j));
    }
    float acc[16];
    sq_partials16<N>(x, acc);
    const float ss = tree16(acc);
    if (kGather && std::is_same_v<T, __nv_bfloat16> && p.round_to == int(DType::f16) &&
        !(ss < kHalfMax * kHalfMax)) {
      // Some |x| may exceed 65504 (bf16 keeps such values; x^2 <= ss): which
      // (rare: needs a norm >= 65504). Non-finite values show in the norm.
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (isfinite(x[j]) && fabsf(x[j]) > kHalfMax) sl |= kStatusDenseOverflow;
    }
    const float norm = __fsqrt_rn(ss);
    if (!isfinite(norm)) sl |= kStatusNonFinite;
    const bool ok = norm != 0.0f && isfinite(norm);
    const float inv = ok ? __fdiv_rn(1.0f, norm) : 0.0f;
    // 3. Rotation: (signs applied in the gather) butterflies, then (with the codes) the block scale.
    fwht_rn<N>(x);
    // 4. Codes (= the CPU's binary search: fl(fl(y * scale) * (1 / norm))
    // against the boundaries, as the tq-mse kernel finds them), packed as
    // pack_ref packs them, into the staging area; then the scale.
    uint8_t* rec = out_stage + hl * run_stride + (reinterpret_cast<uintptr_t>(dest(hl)) & 15) + tl * rb + g.offset;
    if (half == 0) pack_half<N, B0>(x, scale, inv, ok, tabs.seg[0], g.boundaries, lane, valid, rec);
    else pack_half<N, B0 - 1>(x, scale, inv, ok, tabs.seg[1], g.boundaries, lane, valid, rec);
    if (valid) {
      uint16_t* sp = reinterpret_cast<uint16_t*>(rec + g.code_bytes);
      if (g.scale_f32) {
        const unsigned u = __float_as_uint(norm);
        sp[0] = static_cast<uint16_t>(u & 0xffffu);
        sp[1] = static_cast<uint16_t>(u >> 16);
      } else {
        if (!(norm <= kHalfMax) && isfinite(norm)) sl |= kStatusScaleOverflow;
        sp[0] = static_cast<uint16_t>(float_to_half_bits(norm));
      }
      st |= sl;  // a stale row's flags are not the tile's
    }
    if (st) atomicOr(p.status, st);
    __syncthreads();
    // 6. Per head one contiguous run of n records.
    copy_runs_out(out_stage, run_stride, n * rb, nh, warp, kWarpsL, lane, dest);
  }
  append_step_block_done(p.step, append_tiles_of_block(p.n_tiles), 2 * p.n_tiles, p.status);
}

}  // namespace

void launch_split_append_tiles(const AppendLaunch& a, const SplitFormat& f, const SplitSearch& search, int dim,
                               int record_bytes, CUstream_st* stream) {
  if (a.n_tiles == 0) return;
  TQ_ASSERT(f.n_seg == 2 && dim <= kMaxDim && f.seg[0].dim + f.seg[1].dim == dim);
  SplitAppendParams p;
  p.x = static_cast<const uint8_t*>(a.x);
  p.dtype = int(a.dtype);
  p.round_to = int(a.round_to);
  p.n_heads = a.n_heads;
  p.dim = dim;
  p.tiles = a.tiles;
  p.step = a.step;
  p.n_tiles = a.n_tiles;
  p.pool = a.region.pool;
  p.page_bytes = a.region.page_bytes;
  p.region_offset = a.region.region_offset;
  p.page_tokens = a.region.page_tokens;
  p.record_bytes = record_bytes;
  p.status = a.status;
  p.f = f;
  const int grid = std::min(a.n_tiles, 8 * append_sm_count());
  // turbo2.5 / turbo3.5 (hi bits 3 / 4, lo one less) with their bits fixed; other widths read them.
  const int b0 = f.seg[1].bits == f.seg[0].bits - 1 && (f.seg[0].bits == 3 || f.seg[0].bits == 4) ? f.seg[0].bits : 0;
  // Its 4-bit halves read a one-boundary-a-cell table (every 4-bit codebook
  // has one: CudaAppend.SearchTableCodesEqualBinarySearch); else the warp kernel.
  auto table_ok = [&](int i) { return f.seg[i].bits != 4 || search.seg[i].search == AppendSearch::table1; };
  const bool tables = table_ok(0) && table_ok(1);
  if (f.halves(dim) && b0 > 0 && tables && (dim == 64 || dim == 128 || dim == 256)) {
    // Two lanes a vector: the input rows, then the staged records of a tile.
    const int rows = append_rows_per_tile(dim), threads = 2 * rows;
    const int heads = std::min(a.n_heads, rows);
    const int elem = a.dtype == DType::f32 ? 4 : 2;
    // The input rows, then (16-bit S) the gathered half-vectors (half_pitch), then the records.
    const bool gathered = elem == 2 || a.round_to != DType::f32;
    const int out_offset = rows * (dim * elem + 16) + (gathered ? rows * 2 * (dim / 2 * 2 + 16) : 0);
    const int smem = out_offset + ((rows * record_bytes + 32 * heads + 15) & ~15);
    auto launch = [&](auto kernel) {
      const int nb = append_blocks_per_sm(reinterpret_cast<const void*>(kernel), smem, threads);
      kernel<<<std::min(a.n_tiles, nb * append_sm_count()), threads, smem, stream>>>(p, out_offset, search);
    };
    auto by_type = [&](auto d, auto b) {
      constexpr int D = decltype(d)::value, B = decltype(b)::value;
      if (a.dtype == DType::bf16) launch(halves_lane_kernel<D, B, __nv_bfloat16, __nv_bfloat16>);
      else if (a.dtype == DType::f16) launch(halves_lane_kernel<D, B, __half, __half>);
      else if (a.round_to == DType::f16) launch(halves_lane_kernel<D, B, float, __half>);
      else if (a.round_to == DType::bf16) launch(halves_lane_kernel<D, B, float, __nv_bfloat16>);
      else launch(halves_lane_kernel<D, B, float, float>);
    };
    using I64 = std::integral_constant<int, 64>;
    using I128 = std::integral_constant<int, 128>;
    using I256 = std::integral_constant<int, 256>;
    using I3 = std::integral_constant<int, 3>;
    using I4 = std::integral_constant<int, 4>;
    if (dim == 64) b0 == 3 ? by_type(I64{}, I3{}) : by_type(I64{}, I4{});
    else if (dim == 128) b0 == 3 ? by_type(I128{}, I3{}) : by_type(I128{}, I4{});
    else b0 == 3 ? by_type(I256{}, I3{}) : by_type(I256{}, I4{});
  } else if (f.halves(dim) && (dim == 64 || dim == 128 || dim == 256)) {
    auto launch = [&](auto kernel) { kernel<<<grid, kThreads, 0, stream>>>(p); };
    if (dim == 64) launch(halves_append_kernel<64>);
    else if (dim == 128) launch(halves_append_kernel<128>);
    else launch(halves_append_kernel<256>);
  } else if (outlier_std_layout(f, dim) && f.seg[0].bits == 6 && (f.seg[1].bits == 4 || f.seg[1].bits == 3)) {
    // turbo4-out / paper_mse-out at head_dim 128 / 256.
    auto launch = [&](auto kernel) { kernel<<<grid, kThreads, 0, stream>>>(p); };
    auto by_type = [&](auto d, auto b1) {
      constexpr int D = decltype(d)::value, B1 = decltype(b1)::value;
      if (a.dtype == DType::bf16) launch(outlier_std_kernel<D, 6, B1, __nv_bfloat16>);
      else if (a.dtype == DType::f16) launch(outlier_std_kernel<D, 6, B1, __half>);
      else launch(outlier_std_kernel<D, 6, B1, float>);
    };
    using I128 = std::integral_constant<int, 128>;
    using I256 = std::integral_constant<int, 256>;
    using I3 = std::integral_constant<int, 3>;
    using I4 = std::integral_constant<int, 4>;
    if (dim == 128) f.seg[1].bits == 4 ? by_type(I128{}, I4{}) : by_type(I128{}, I3{});
    else f.seg[1].bits == 4 ? by_type(I256{}, I4{}) : by_type(I256{}, I3{});
  } else if (f.seg[0].dim <= 32 && (dim == 64 || dim == 128 || dim == 256)) {
    auto launch = [&](auto kernel) { kernel<<<grid, kThreads, 0, stream>>>(p); };
    if (dim == 64) launch(outlier_append_kernel<64>);
    else if (dim == 128) launch(outlier_append_kernel<128>);
    else launch(outlier_append_kernel<256>);
  } else {
    split_append_kernel<<<grid, kThreads, 0, stream>>>(p);
  }
  TQ_CUDA_CHECK_LAUNCH();
}

}  // namespace tq::cuda
