// Quantize-append for channel-split tq-mse formats (turbo2.5, turbo3.5,
// turbo4-out, paper_mse-out's keys: quant::SplitQuantizer), bit-identical to
// the CPU encoder. Per vector: round each element to the layer's format (as
// KvCache::append does), gather the head's channels into [hi | lo], then for
// each of the two segments what MseQuantizer::encode_one does over its
// sub-vector: norm by the canonical 16-lane sum, the segment's rotation
// (split_rotation.cuh, any dim), codes by the CPU's binary search, packed
// little-endian into the sub-record, fp16 (or f32) norm after the codes.
//
// Three kernels. The general one (one warp a vector, in shared memory,
// lanes over its elements) takes any split: outlier channels, segments that
// are not powers of two. Splits in two halves with one-block rotations
// (turbo2.5, turbo3.5) take halves_lane_kernel at head_dim 64 / 128 / 256
// (two lanes a vector, a half's elements in registers, as the tq-mse
// kernel: 128K Llama tokens from bf16 0.63 ms for turbo2.5, ~4.8x one read
// of the input, against ~2.9x for the tq-mse kernel; Gemma's d 256 ~6x) and
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
    const AppendTile t = p.tiles[ti];
    const int rows = int(t.n) * t.nh;
    for (int row = warp; row < rows; row += n_warps) f(t, row_at(p, t, row, dim));
  }
}

// The record of row (tile t, token tl, head): each segment's codes packed
// (pack_ref: stream bit k is bit k % b of code k / b), then its scale. codes:
// the row's codes in [seg 0 | seg 1] order (shared memory, written before a
// __syncwarp); every lane of the warp takes part.
__device__ void write_record(const SplitAppendParams& p, const AppendTile& t, int tl, int head,
                             const uint8_t* codes, float norm0, float norm1, int lane, int& st) {
  const int n0 = p.f.seg[0].dim;
  uint8_t* rec0 = p.pool + size_t(t.page) * p.page_bytes + p.region_offset +
                  (size_t(head) * p.page_tokens + t.slot0 + tl) * p.record_bytes;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const SplitSegment& g = p.f.seg[s];
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
}

// Splits in two halves at B0 and B0 - 1 bits (turbo2.5: 3/2, turbo3.5: 4/3),
// head_dim 64, 128 or 256, input type T: the tq-mse append kernel's layout --
// two lanes a vector, lane 2v its hi half and 2v + 1 its lo half, D/2
// elements each in registers -- so a half's fixed work (norm, division,
// scale, packing) is paid once per D/2 elements instead of once per 4
// (halves_append_kernel). A tile's input rows arrive in shared memory by
// cp.async (all in flight at once); each lane takes its half's channels
// (gathered, below) and rounds them, takes the norm (the canonical 16
// partial sums) and the rotation in registers, and finds each code from
// boundaries in registers (the lo half's padded with +inf, so the two lanes
// of a vector do not diverge).
// Both packings are computed and each lane keeps its own; the records are
// staged and go out per head as contiguous runs, as the tq-mse kernel's do.
// The gather is its own pass over the tile (gather_halves): a thread takes
// one channel slot of one head, loads its source column once and copies it
// for every token of the tile, sign-flipped by the half's rotation signs,
// into contiguous half-vectors that the lanes then read 16 bytes at a time.
// (Gathering inside the lanes cost two L1 loads an element, the column and
// the sign, for every vector. With that, a binary search through shared
// memory and per-element rounding branches the kernel took 1.10 ms for 128K
// Llama tokens; a second row buffer, so that the next tile's rows land
// during this one's work, measured no faster: the work, not the loads,
// sets its time.)
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

// The tile's rows (in: [rows][pitch] as copied, type T) gathered into
// half-vectors hv: [rows][2][half_pitch] of S in channel order: element j of
// half hh of row r is in[r][channels[h][hh * N + j]] with its sign bit
// flipped where the half's signs1[j] is -1. Flipping before rounding, norm
// and rotation gives the CPU's bits: rounding is symmetric, the norm
// squares, and the CPU's x * signs1 is that same exact negation. f32 input
// (S: the layer's 16-bit format) is rounded here, as round_checked rounds
// and with its flags in st, so that the lanes read 16-bit halves as for
// 16-bit input.
template <int D, typename T, typename S, int kThreadsL>
__device__ __forceinline__ void gather_halves(const SplitAppendParams& p, const AppendTile& t, const uint8_t* in,
                                              int pitch, uint8_t* hv, int& st) {
  using UT = typename ElemBits<T>::U;
  using US = typename ElemBits<S>::U;
  constexpr int N = D / 2, kHP = half_pitch<D, S>();
  const int n = t.n, nh = t.nh;
  for (int idx = threadIdx.x; idx < nh * D; idx += kThreadsL) {
    const int hl = idx / D, e = idx % D, hh = e / N, j = e % N;
    const int c = __ldg(p.f.channels + size_t(t.h0 + hl) * D + e);
    const UT flip = __ldg(p.f.seg[hh].rot.signs1 + j) < 0.0f ? ElemBits<T>::kSign : UT(0);
    const uint8_t* src = in + hl * pitch + c * int(sizeof(T));
    uint8_t* dst = hv + (2 * hl + hh) * kHP + j * int(sizeof(S));
    for (int tl = 0; tl < n; ++tl) {
      const UT v = UT(*reinterpret_cast<const UT*>(src + tl * nh * pitch) ^ flip);
      US o;
      if constexpr (std::is_same_v<T, S>) {
        o = v;
      } else if constexpr (std::is_same_v<S, __half>) {  // f32 -> the f16 grid
        const unsigned ax = v & 0x7fffffffu;
        if (ax >= 0x38800000u && ax <= 0x477fe000u) {  // 2^-14 <= |x| <= 65504: round_f16_normal's bits
          const unsigned r = (v + 0xfffu + ((v >> 13) & 1u)) & 0xffffe000u;
          o = US(((r >> 16) & 0x8000u) | (((r & 0x7fffffffu) >> 13) - 0x1c000u));
        } else {
          if (ax >= 0x7f800000u) st |= kStatusNonFinite;
          else if (ax > 0x477fe000u) st |= kStatusDenseOverflow;
          o = US(float_to_half_bits(__uint_as_float(v)));  // subnormal halves (refused values: any)
        }
      } else {  // f32 -> bf16
        const float a = __uint_as_float(v);
        if (!isfinite(a)) st |= kStatusNonFinite;
        o = isnan(a) ? US((v >> 16) | 0x40u) : US(__float_as_uint(round_bf16(a)) >> 16);
      }
      *reinterpret_cast<US*>(dst + tl * nh * 2 * kHP) = o;
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

template <int D, int B0, typename T, typename S>
__global__ void __launch_bounds__(2 * LaneRows<D>::kRows, 2)
    halves_lane_kernel(const __grid_constant__ SplitAppendParams p, int out_offset) {
  constexpr int N = D / 2, kRows = LaneRows<D>::kRows, kThreadsL = 2 * kRows, kWarpsL = kThreadsL / 32;
  constexpr int kRowBytes = D * int(sizeof(T)), kPitch = kRowBytes + 16, kChunks = kRowBytes / 16;
  constexpr int W0 = N * B0 / 32, W1 = N * (B0 - 1) / 32;  // packed words of the hi / lo half
  static_assert(D == 64 || D == 128 || D == 256, "two halves of 32, 64 or 128 elements a lane");
  extern __shared__ __align__(16) uint8_t smem[];
  // S: the type the gather pass stores, the input's or (f32 input) the
  // layer's 16-bit format. f32 input kept as f32 (layers of f32 format:
  // a gathered copy would halve the resident blocks) is gathered in place.
  constexpr bool kGather = sizeof(S) == 2;
  constexpr int kHP = half_pitch<D, S>();
  uint8_t* const in = smem;                // [kRows][kPitch] input rows
  uint8_t* const hv = smem + kRows * kPitch;  // kGather: [kRows][2][kHP] gathered halves
  uint8_t* const out_stage = smem + out_offset;
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x / 32), 0), lane = threadIdx.x % 32;
  const int rl = threadIdx.x >> 1, half = threadIdx.x & 1;  // row of the tile, hi (0) or lo (1)
  const SplitSegment& g = p.f.seg[half];
  // This half's boundaries in registers, the lo half's padded with +inf, -0
  // as +0: a code is the binary search's first step and then the count of
  // boundaries below its value in the chosen half (lt01), which is what the
  // CPU's binary search returns over sorted boundaries, without its chain of
  // dependent loads (B0 of them an element).
  float bnds[(1 << B0) - 1];
#pragma unroll
  for (int k = 0; k < (1 << B0) - 1; ++k)
    bnds[k] = k < (1 << g.bits) - 1 ? __fadd_rn(__ldg(g.boundaries + k), 0.0f) : INFINITY;
  const float scale = g.rot.block_scale[0];
  const int rb = p.record_bytes;

  for (int ti = blockIdx.x; ti < p.n_tiles; ti += gridDim.x) {
    const AppendTile t = p.tiles[ti];
    const int n = t.n, nh = t.nh, rows = n * nh;
    int st = 0;
    __syncthreads();  // the previous tile's rows and records are consumed
    // 1. The tile's input rows into shared memory, every copy in flight at once.
    for (int i = threadIdx.x; i < rows * kChunks; i += kThreadsL) {
      const int r = i / kChunks, k = i % kChunks;
      const size_t row = size_t(t.token0 + r / nh) * p.n_heads + t.h0 + r % nh;
      cp_async16(in + r * kPitch + 16 * k, p.x + row * kRowBytes + 16 * k);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    if constexpr (kGather) {
      gather_halves<D, T, S, kThreadsL>(p, t, in, kPitch, hv, st);
      __syncthreads();
    }
    const int run_stride = (n * rb + 31) & ~15;
    auto dest = [&](int h) {  // first record of head h of the tile
      return p.pool + size_t(t.page) * p.page_bytes + p.region_offset +
             (size_t(t.h0 + h) * p.page_tokens + t.slot0) * rb;
    };
    if (rl < rows) {
      const int tl = rl / nh, hl = rl % nh;
      // 2. This half's channels (gathered, signs applied), rounded; its norm
      // from the 16 partial sums.
      float x[N];
      if constexpr (kGather) {
        load_gathered16<N, S>(p, reinterpret_cast<const uint4*>(hv + (2 * rl + half) * kHP), x);
      } else {
        const int* ch = p.f.channels + size_t(t.h0 + hl) * D + half * N;
        const float* row = reinterpret_cast<const float*>(in + rl * kPitch);
#pragma unroll
        for (int j = 0; j < N; ++j) x[j] = __fmul_rn(round_checked(p, row[__ldg(ch + j)], st), __ldg(g.rot.signs1 + j));
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
          if (isfinite(x[j]) && fabsf(x[j]) > kHalfMax) st |= kStatusDenseOverflow;
      }
      const float norm = __fsqrt_rn(ss);
      if (!isfinite(norm)) st |= kStatusNonFinite;
      const bool ok = norm != 0.0f && isfinite(norm);
      const float inv = ok ? __fdiv_rn(1.0f, norm) : 0.0f;
      // 3. Rotation: (signs applied in the gather) butterflies, then (with the codes) the block scale.
      fwht_rn<N>(x);
      // 4. Codes: the count of boundaries below (bnds; = the CPU's binary
      // search; zero or non-finite norm: codes 0), packed as pack_ref packs
      // them, at both widths.
      unsigned w0[W0], w1[W1];
#pragma unroll
      for (int w = 0; w < W0; ++w) w0[w] = 0;
#pragma unroll
      for (int w = 0; w < W1; ++w) w1[w] = 0;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float v = __fmul_rn(__fmul_rn(x[j], scale), inv);
        // The search's first step, then the count in the half it chose.
        constexpr int kMid = 1 << (B0 - 1);
        const bool up = bnds[kMid - 1] < v;
        unsigned lo = up ? unsigned(kMid) : 0u;
#pragma unroll
        for (int k = 0; k < kMid - 1; ++k) lo += lt01(up ? bnds[kMid + k] : bnds[k], v);
        const unsigned c = ok ? lo : 0u;
        const int p0 = j * B0, p1 = j * (B0 - 1);
        w0[p0 / 32] |= c << (p0 % 32);
        if (p0 % 32 + B0 > 32) w0[p0 / 32 + 1] |= c >> (32 - p0 % 32);
        w1[p1 / 32] |= c << (p1 % 32);
        if (p1 % 32 + B0 - 1 > 32) w1[p1 / 32 + 1] |= c >> (32 - p1 % 32);
      }
      // 5. The sub-record (codes, then the scale) into the staging area.
      uint8_t* rec = out_stage + hl * run_stride + (reinterpret_cast<uintptr_t>(dest(hl)) & 15) + tl * rb + g.offset;
      if (half == 0) store_words_u16<W0>(rec, w0);
      else store_words_u16<W1>(rec, w1);
      uint16_t* sp = reinterpret_cast<uint16_t*>(rec + g.code_bytes);
      if (g.scale_f32) {
        const unsigned u = __float_as_uint(norm);
        sp[0] = static_cast<uint16_t>(u & 0xffffu);
        sp[1] = static_cast<uint16_t>(u >> 16);
      } else {
        if (!(norm <= kHalfMax) && isfinite(norm)) st |= kStatusScaleOverflow;
        sp[0] = static_cast<uint16_t>(float_to_half_bits(norm));
      }
    }
    if (st) atomicOr(p.status, st);
    __syncthreads();
    // 6. Per head one contiguous run of n records.
    copy_runs_out(out_stage, run_stride, n * rb, nh, warp, kWarpsL, lane, dest);
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
  const int grid = std::min(a.n_tiles, 8 * append_sm_count());
  // turbo2.5 / turbo3.5 (hi bits 3 / 4, lo one less) with their bits fixed; other widths read them.
  const int b0 = f.seg[1].bits == f.seg[0].bits - 1 && (f.seg[0].bits == 3 || f.seg[0].bits == 4) ? f.seg[0].bits : 0;
  if (f.halves(dim) && b0 > 0 && (dim == 64 || dim == 128 || dim == 256)) {
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
      kernel<<<std::min(a.n_tiles, nb * append_sm_count()), threads, smem, stream>>>(p, out_offset);
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
  } else {
    split_append_kernel<<<grid, kThreads, 0, stream>>>(p);
  }
  TQ_CUDA_CHECK_LAUNCH();
}

}  // namespace tq::cuda
