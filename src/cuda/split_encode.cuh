// Internal: what the prefill append (split_append.cu) and the captured step
// (mse_step.cu) share of a channel-split record's encoding -- the segments'
// norms from the canonical lane sums, an outlier split's codes in registers,
// and the packed record -- so that both write the CPU encoder's bytes
// (kernels_ref.cpp's norm tree, Rotation::forward, the binary search,
// pack_ref's bit order). Include after mse_append_kernel.cuh (kHalfMax,
// float_to_half_bits).
#pragma once

#include <cstdint>
#include <type_traits>

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

// The segments' norms as outlier_encode takes them (the canonical 16 lane
// sums; x0 / x1 as there).
template <int D>
__device__ __forceinline__ void outlier_norms(const float (&x0)[1], const float (&x1)[D / 32], int n0, int lane,
                                              float& norm0, float& norm1, int& st) {
  const int l16 = lane & 15, hsel = lane >> 4;
  float acc = 0.0f;
  const float o0 = __shfl_xor_sync(0xffffffffu, x0[0], 16);
  {  // segment 0 (lanes 0-15): m = 0 is this lane's element, m = 1 lane l16 + 16's
    const float v0 = hsel ? 0.0f : x0[0], v1 = hsel ? 0.0f : o0;
    acc = __fadd_rn(acc, __fmul_rn(v0, v0));
    if (n0 > 16) acc = hsel ? acc : __fadd_rn(acc, __fmul_rn(v1, v1));
  }
#pragma unroll
  for (int k = 0; k < D / 32; ++k) {  // segment 1 (lanes 16-31): m = 2k in lane l16, m = 2k + 1 in lane l16 + 16
    const float o = __shfl_xor_sync(0xffffffffu, x1[k], 16);
    if (hsel) {
      acc = __fadd_rn(acc, __fmul_rn(o, o));
      acc = __fadd_rn(acc, __fmul_rn(x1[k], x1[k]));
    }
  }
  segment_norms(acc, l16, norm0, norm1, st);
}

// What the encoder's rotation needs of element i of [seg 0 | seg 1], staged
// once a block (stage_outlier_elems) so that a vector reads it with one
// 16-byte load a register instead of walking the blocks per vector: its first
// sign, its Hadamard block's scale, its second sign (1 in a one-round
// segment), and in `pm` its permutation source relative to the segment
// (bits 0-15; itself in a one-round segment) and the butterfly mask (bits
// 16-31): its block's size - 1, so that the stage of stride h applies
// exactly where mask & h (the blocks are aligned powers of two).
struct OutlierElem {
  float s1, scale, s2;
  int pm;
};
static_assert(sizeof(OutlierElem) == 16);

// Stages split f's elements (D = both segments' dims) into e[D]; every
// thread of the block calls it; the caller's barrier publishes it.
__device__ __forceinline__ void stage_outlier_elems(const SplitFormat& f, int n0, int D, OutlierElem* e) {
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const bool lo = i >= n0;
    const int j = lo ? i - n0 : i;
    const SegmentRotation& R = lo ? f.seg[1].rot : f.seg[0].rot;
    int off = 0, size = 1;
    float scale = 1.0f;
    for (int b = 0; b < R.n_blocks; ++b) {
      if (j >= off && j < off + R.blocks[b]) {
        size = R.blocks[b];
        scale = R.block_scale[b];
      }
      off += R.blocks[b];
    }
    OutlierElem q;
    q.s1 = R.signs1[j];
    q.scale = scale;
    q.s2 = R.perm != nullptr ? R.signs2[j] : 1.0f;
    q.pm = (R.perm != nullptr ? R.perm[j] : j) | ((size - 1) << 16);
    e[i] = q;
  }
}

// One segment's rotation (Rotation::forward, operation for operation: first
// signs, each block's butterflies stage by stage, its scale; with two rounds
// the permutation with the second signs, then the blocks again) by one warp,
// element i = lane + 32 k of the segment in t[k] (i >= n: left as it is).
// e: the segment's OutlierElem; scratch: its n floats of the warp's shared
// memory (two rounds). A butterfly's pair is (a, c) = (lower, upper
// element): the lower lane keeps a + c, the upper a - c, both as one fma
// with +-1 (exact, so the one rounding is the CPU's add / subtract).
template <int E>
__device__ __forceinline__ void outlier_rotate(float (&t)[E], const OutlierElem* e, int n, bool two_rounds,
                                               float* scratch, int lane) {
  int pm[E];  // OutlierElem::pm: the butterfly mask << 16 | the permutation source
  float sc[E];
#pragma unroll
  for (int k = 0; k < E; ++k) {
    const int i = lane + 32 * k;
    pm[k] = 0;
    sc[k] = 1.0f;
    if (i < n) {
      const OutlierElem q = e[i];
      t[k] = __fmul_rn(t[k], q.s1);
      pm[k] = q.pm;
      sc[k] = q.scale;
    }
  }
  auto blocks = [&] {
#pragma unroll
    for (int h = 1; h < 32; h *= 2) {
      const float sg = (lane & h) ? -1.0f : 1.0f;
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const float o = __shfl_xor_sync(0xffffffffu, t[k], h);
        if (pm[k] & (h << 16)) t[k] = __fmaf_rn(sg, t[k], o);
      }
    }
    int nb[E];  // each register's block size (mask + 1)
#pragma unroll
    for (int k = 0; k < E; ++k) nb[k] = (pm[k] >> 16) + 1;
    register_butterflies(t, nb);
#pragma unroll
    for (int k = 0; k < E; ++k) t[k] = __fmul_rn(t[k], sc[k]);
  };
  blocks();
  if (two_rounds) {
#pragma unroll
    for (int k = 0; k < E; ++k)
      if (lane + 32 * k < n) scratch[lane + 32 * k] = t[k];
    __syncwarp();
#pragma unroll
    for (int k = 0; k < E; ++k)
      if (lane + 32 * k < n) t[k] = __fmul_rn(scratch[pm[k] & 0xffff], e[lane + 32 * k].s2);
    __syncwarp();  // scratch is written again after this
    blocks();
  }
}

// The CPU's binary search over a segment's 2^bits - 1 boundaries b (shared
// memory): #{boundaries < v}; bits is warp-uniform, the steps unrolled.
__device__ __forceinline__ int boundary_search(const float* b, int bits, float v) {
  int lo = 0;
#pragma unroll
  for (int s = 7; s >= 0; --s)
    if (s < bits && b[lo + (1 << s) - 1] < v) lo += 1 << s;
  return lo;
}

// The codes of one vector of a split whose first segment has at most 32
// channels (the -out presets' outlier channels), by one warp, in registers:
// lane l holds element l of segment 0 in x0 and elements l + 32 k of segment
// 1 in x1, rounded. The norms by the canonical 16 lane sums (lanes 0-15
// segment 0, lanes 16-31 segment 1), each segment's rotation
// (outlier_rotate; elems as stage_outlier_elems stages them, two0 / two1:
// the segments with two rounds; scratch: D floats of the warp's shared
// memory), then the codes by the CPU's binary search over each segment's
// boundaries (bnd0 / bnd1, shared memory) into codes[0 .. D) ([seg 0 |
// seg 1]; the caller's __syncwarp publishes them). A zero (or non-finite)
// norm gives codes 0.
template <int D>
__device__ __forceinline__ void outlier_encode(float (&x0)[1], float (&x1)[D / 32], int n0, int bits0, int bits1,
                                               const float* bnd0, const float* bnd1, const OutlierElem* elems,
                                               bool two0, bool two1, float* scratch, uint8_t* codes, int lane,
                                               float& norm0, float& norm1, int& st) {
  constexpr int EL = D / 32;
  const int n1 = D - n0;
  outlier_norms<D>(x0, x1, n0, lane, norm0, norm1, st);
  // Each segment's rotation.
  outlier_rotate(x0, elems, n0, two0, scratch, lane);
  outlier_rotate(x1, elems + n0, n1, two1, scratch + n0, lane);
  // Codes: #{boundaries < y / norm} by the CPU's binary search.
  const bool ok0 = norm0 != 0.0f && isfinite(norm0), ok1 = norm1 != 0.0f && isfinite(norm1);
  const float inv0 = ok0 ? __fdiv_rn(1.0f, norm0) : 0.0f, inv1 = ok1 ? __fdiv_rn(1.0f, norm1) : 0.0f;
  if (lane < n0) codes[lane] = static_cast<uint8_t>(ok0 ? boundary_search(bnd0, bits0, __fmul_rn(x0[0], inv0)) : 0);
#pragma unroll
  for (int k = 0; k < EL; ++k)
    if (lane + 32 * k < n1)
      codes[n0 + lane + 32 * k] =
          static_cast<uint8_t>(ok1 ? boundary_search(bnd1, bits1, __fmul_rn(x1[k], inv1)) : 0);
}

// The -out presets' layout at head_dim 128 / 256 (outlier_std_layout):
// segment 0 the D/8 outlier channels in one Hadamard block, one round;
// segment 1 the other 7D/8 in blocks D/2, D/4, D/8 (largest first, aligned),
// two rounds. Every butterfly's extent is then known at compile time, so the
// rotation needs no per-element mask (outlier_rotate's masks cost ~270 warp
// instructions a d-128 vector: the compiler kept them as bits of a register).
template <int D>
struct OutlierStd {
  static_assert(D == 128 || D == 256);
  static constexpr int kN0 = D / 8, kN1 = D - kN0, kEL = D / 32;
  // Segment 1's block of register k (elements 32k .. 32k + 31; a block of
  // D/8 < 32 elements fills the start of its register, whose other lanes
  // are past the segment): 0, 1, 2, or -1 past the segment.
  __host__ __device__ static constexpr int block_of(int k) {
    return 32 * k < D / 2 ? 0 : 32 * k < 3 * D / 4 ? 1 : 32 * k < kN1 ? 2 : -1;
  }
  __host__ __device__ static constexpr int block_size(int b) { return b == 0 ? D / 2 : b == 1 ? D / 4 : D / 8; }
};

// Whether split f (head_dim dim) has the OutlierStd layout.
inline bool outlier_std_layout(const SplitFormat& f, int dim) {
  if (f.n_seg != 2 || (dim != 128 && dim != 256)) return false;
  const SegmentRotation& r0 = f.seg[0].rot;
  const SegmentRotation& r1 = f.seg[1].rot;
  return f.seg[0].dim == dim / 8 && f.seg[1].dim == dim - dim / 8 && r0.perm == nullptr && r0.n_blocks == 1 &&
         r0.blocks[0] == dim / 8 && r1.perm != nullptr && r1.n_blocks == 3 && r1.blocks[0] == dim / 2 &&
         r1.blocks[1] == dim / 4 && r1.blocks[2] == dim / 8;
}

// The CPU's binary search at a compile-time width.
template <int B>
__device__ __forceinline__ int boundary_search_ct(const float* b, float v) {
  int lo = 0;
#pragma unroll
  for (int step = 1 << (B - 1); step >= 1; step /= 2)
    if (b[lo + step - 1] < v) lo += step;
  return lo;
}

// outlier_encode for the OutlierStd layout at widths B0 / B1: the same
// operations, the rotation's extents and the searches' widths unrolled.
// sg[j]: -1 where lane bit j is set, else 1 (a butterfly's upper lane keeps
// a - c: fma(-1, c, a)). codes: the warp's D bytes (16-byte aligned).
template <int D, int B0, int B1>
__device__ __forceinline__ void outlier_encode_std(float (&x0)[1], float (&x1)[D / 32], const float* bnd0,
                                                   const float* bnd1, const OutlierElem* elems,
                                                   const SegmentRotation& r0, const SegmentRotation& r1,
                                                   const float (&sg)[5], float* scratch, uint8_t* codes, int lane,
                                                   float& norm0, float& norm1, int& st) {
  using L = OutlierStd<D>;
  constexpr int EL = L::kEL, N0 = L::kN0, N1 = L::kN1;
  outlier_norms<D>(x0, x1, N0, lane, norm0, norm1, st);
  // Segment 0: signs, butterflies of stride < D/8, the block's scale.
  if (lane < N0) x0[0] = __fmul_rn(x0[0], elems[lane].s1);
#pragma unroll
  for (int j = 0; (1 << j) < N0; ++j) {
    const float o = __shfl_xor_sync(0xffffffffu, x0[0], 1 << j);
    x0[0] = __fmaf_rn(sg[j], x0[0], o);
  }
  x0[0] = __fmul_rn(x0[0], r0.block_scale[0]);
  // Segment 1: signs; a round; the permutation with the second signs; a round.
  const OutlierElem* e1 = elems + N0;
#pragma unroll
  for (int k = 0; k < EL; ++k)
    if (L::block_of(k) >= 0 && lane + 32 * k < N1) x1[k] = __fmul_rn(x1[k], e1[lane + 32 * k].s1);
  auto round = [&] {
#pragma unroll
    for (int j = 0; j < 5; ++j)
#pragma unroll
      for (int k = 0; k < EL; ++k)
        if (L::block_of(k) >= 0 && (1 << j) < L::block_size(L::block_of(k))) {
          const float o = __shfl_xor_sync(0xffffffffu, x1[k], 1 << j);
          x1[k] = __fmaf_rn(sg[j], x1[k], o);
        }
    int nb[EL];  // each register's block size (0 past the segment): constants
#pragma unroll
    for (int k = 0; k < EL; ++k) nb[k] = L::block_of(k) >= 0 ? L::block_size(L::block_of(k)) : 0;
    register_butterflies(x1, nb);
#pragma unroll
    for (int k = 0; k < EL; ++k)
      if (L::block_of(k) >= 0) x1[k] = __fmul_rn(x1[k], r1.block_scale[L::block_of(k)]);
  };
  round();
#pragma unroll
  for (int k = 0; k < EL; ++k)
    if (L::block_of(k) >= 0 && lane + 32 * k < N1) scratch[lane + 32 * k] = x1[k];
  __syncwarp();
#pragma unroll
  for (int k = 0; k < EL; ++k)
    if (L::block_of(k) >= 0 && lane + 32 * k < N1) {
      const OutlierElem q = e1[lane + 32 * k];
      x1[k] = __fmul_rn(scratch[q.pm & 0xffff], q.s2);
    }
  __syncwarp();  // scratch is written again by the next vector
  round();
  // Codes.
  const bool ok0 = norm0 != 0.0f && isfinite(norm0), ok1 = norm1 != 0.0f && isfinite(norm1);
  const float inv0 = ok0 ? __fdiv_rn(1.0f, norm0) : 0.0f, inv1 = ok1 ? __fdiv_rn(1.0f, norm1) : 0.0f;
  if (lane < N0) codes[lane] = static_cast<uint8_t>(ok0 ? boundary_search_ct<B0>(bnd0, __fmul_rn(x0[0], inv0)) : 0);
#pragma unroll
  for (int k = 0; k < EL; ++k)
    if (L::block_of(k) >= 0 && lane + 32 * k < N1)
      codes[N0 + lane + 32 * k] = static_cast<uint8_t>(ok1 ? boundary_search_ct<B1>(bnd1, __fmul_rn(x1[k], inv1)) : 0);
}

// A segment's scale after its codes (write_split_record's bytes).
__device__ __forceinline__ void write_segment_scale(uint8_t* at, int scale_f32, float norm, int& st) {
  if (scale_f32) {
    const unsigned u = __float_as_uint(norm);
#pragma unroll
    for (int j = 0; j < 4; ++j) at[j] = static_cast<uint8_t>(u >> (8 * j));
  } else {
    if (!(norm <= kHalfMax) && isfinite(norm)) st |= kStatusScaleOverflow;
    const unsigned u = float_to_half_bits(norm);
    at[0] = static_cast<uint8_t>(u & 0xffu);
    at[1] = static_cast<uint8_t>(u >> 8);
  }
}

// write_split_record for the OutlierStd layout at B0 / B1 bits: lane g packs
// a group of 8 codes (8 * B bits: B whole bytes of pack_ref's stream, code u
// of the group at bits B*u ..) -- segment 1's N1/8 groups, then segment 0's
// N0/8 (16 or 32 groups in all) -- then lanes 0 and 1 write the scales.
template <int D, int B0, int B1>
__device__ __forceinline__ void write_outlier_record_std(uint8_t* rec0, const SplitFormat& f, const uint8_t* codes,
                                                         float norm0, float norm1, int lane, int& st) {
  using L = OutlierStd<D>;
  constexpr int G1 = L::kN1 / 8, G0 = L::kN0 / 8;
  static_assert(G0 + G1 <= 32);
  auto pack = [&](const uint8_t* c8, uint8_t* out, auto bits) {
    constexpr int B = decltype(bits)::value;
    const uint2 c = *reinterpret_cast<const uint2*>(c8);
    unsigned long long v = 0;
#pragma unroll
    for (int u = 0; u < 8; ++u)
      v |= static_cast<unsigned long long>(((u < 4 ? c.x : c.y) >> (8 * (u % 4))) & 0xffu) << (B * u);
#pragma unroll
    for (int j = 0; j < B; ++j) out[j] = static_cast<uint8_t>(v >> (8 * j));
  };
  if (lane < G1) pack(codes + L::kN0 + 8 * lane, rec0 + f.seg[1].offset + B1 * lane, std::integral_constant<int, B1>{});
  else if (lane < G1 + G0)
    pack(codes + 8 * (lane - G1), rec0 + f.seg[0].offset + B0 * (lane - G1), std::integral_constant<int, B0>{});
  if (lane < 2) {
    const SplitSegment& g = f.seg[lane];
    write_segment_scale(rec0 + g.offset + g.code_bytes, g.scale_f32, lane ? norm1 : norm0, st);
  }
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
    // x / b for x < 8 * 256 (a code block holds <= 256 bytes), b <= 8, as
    // floor(x * ~(1 / b) + 1/16): x / b is an integer or >= 1/8 below the
    // next, far beyond the approximate reciprocal's error (an integer
    // division by a register costs ~60 instructions).
    const float rcp_b = __fdividef(1.0f, float(b));
    auto div_b = [&](int x) { return __float2int_rd(__fmaf_rn(float(x), rcp_b, 0.0625f)); };
    for (int k = lane; k < total; k += 32) {
      if (k < g.code_bytes) {
        const int i0 = div_b(8 * k), i1 = min(g.dim - 1, div_b(8 * k + 7));
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
