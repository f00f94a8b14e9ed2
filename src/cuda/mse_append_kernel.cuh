// Internal: the quantize-append kernel (see mse_append.cu for what it
// computes and how it is laid out). Included by one translation unit per
// input type (mse_append_{f32,f16,bf16}.cu) so that the 117 instantiations
// (head_dim x bits x search) compile in parallel; all of them with -fmad=false.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cuda/cuda_check.hpp"
#include "cuda/mse_append.hpp"
#include "turboquant/error.hpp"

namespace tq::cuda {

// Shared by the translation units (mse_append.cu).
int append_sm_count();
int append_blocks_per_sm(const void* kernel, int smem, int threads);

namespace {


constexpr unsigned kFull = 0xffffffffu;
// fma(v, 2^s, kMagic) = kMagic + round_to_nearest_even(v * 2^s) for
// |v * 2^s| < 2^22: its bit pattern minus kMagicBits is that integer.
constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
constexpr int kMagicBits = 0x4B400000;
constexpr float kHalfMax = 65504.0f;
constexpr float kHalfMinNormal = 6.103515625e-05f;  // 2^-14

// fp32 -> binary16 bits, round to nearest even: src/util/half.cpp in integer
// arithmetic, so the stored bits cannot depend on the device's conversion
// instruction. (A first version stored the bytes of __float2half_rn(x) and on
// the H200, CUDA 13.0, the low byte came out as trunc(x) while the PTX looked
// right; cause not established.)
__device__ unsigned float_to_half_bits(float f) {
  const unsigned x = __float_as_uint(f);
  const unsigned sign = (x >> 16) & 0x8000u;
  const unsigned abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u)  // inf or NaN
    return abs > 0x7f800000u ? (sign | 0x7e00u | ((abs >> 13) & 0x3ffu)) : (sign | 0x7c00u);
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                         // subnormal half or zero
    if (abs < 0x33000000u) return sign;
    const unsigned exp = abs >> 23;
    const unsigned mant = (abs & 0x7fffffu) | 0x800000u;
    const unsigned shift = 126 - exp;
    const unsigned half_mant = mant >> shift;
    const unsigned rem = mant & ((1u << shift) - 1);
    const unsigned halfway = 1u << (shift - 1);
    unsigned r = half_mant;
    if (rem > halfway || (rem == halfway && (half_mant & 1u))) ++r;
    return sign | r;
  }
  unsigned h = (abs - 0x38000000u) >> 13;
  const unsigned rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | h;
}

// half_to_float(float_to_half(x)) of src/util/half.cpp for 2^-14 <= |x| <=
// 65504 (the normal halves): the mantissa rounded to 10 bits, ties to even.
__device__ __forceinline__ float round_f16_normal(float x) {
  const unsigned u = __float_as_uint(x);
  return __uint_as_float((u + 0xfffu + ((u >> 13) & 1u)) & 0xffffe000u);
}
// The same for |x| < 2^-14 (subnormal halves, multiples of 2^-24): 0.75 + |x|
// lies in [0.5, 1) whose spacing is 2^-24, so one RNE addition rounds |x|
// to that grid, ties to even (0.75 / 2^-24 is even), and the subtraction is
// exact; the sign is put back (float_to_half keeps -0).
__device__ __forceinline__ float round_f16_subnormal(float x) {
  const float r = __fsub_rn(__fadd_rn(fabsf(x), 0.75f), 0.75f);
  return __uint_as_float(__float_as_uint(r) | (__float_as_uint(x) & 0x80000000u));
}
// bf16_to_float(float_to_bf16(x)) for non-NaN x (NaN is refused before).
__device__ __forceinline__ float round_bf16(float x) {
  const unsigned u = __float_as_uint(x);
  return __uint_as_float((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}

// NW words from shared memory as 16-byte reads.
template <int NW>
__device__ __forceinline__ void load_words16(const uint4* src, unsigned* w) {
  static_assert(NW % 4 == 0);
#pragma unroll
  for (int j = 0; j < NW / 4; ++j) {
    const uint4 u = src[j];
    w[4 * j] = u.x;
    w[4 * j + 1] = u.y;
    w[4 * j + 2] = u.z;
    w[4 * j + 3] = u.w;
  }
}

// 16-bit input (pair words: the lower element in the low half). Whether any
// of NP bf16 pairs is below 2^-14 in magnitude (zeros included): one bf16x2
// min a pair. Such values are the only bf16 ones an f16 layer must round.
template <int NP>
__device__ __forceinline__ bool bf16_pairs_below_f16_normal(const unsigned* raw) {
  __nv_bfloat162 mn = __float2bfloat162_rn(1.0f);
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    __nv_bfloat162 h;
    memcpy(&h, &raw[j], 4);
    mn = __hmin2(mn, __habs2(h));
  }
  const float2 m = __bfloat1622float2(mn);
  return fminf(m.x, m.y) < kHalfMinNormal;
}
// A pair word as two floats; fix: values below 2^-14 rounded to the subnormal
// halves (bf16 input, f16 layer: the rare case above).
template <bool kBf16>
__device__ __forceinline__ void pair_to_floats(unsigned u, bool fix, float& a, float& b) {
  if constexpr (kBf16) {
    a = __uint_as_float(u << 16);
    b = __uint_as_float(u & 0xffff0000u);
  } else {
    __half2 h;
    memcpy(&h, &u, 4);
    const float2 f = __half22float2(h);
    a = f.x;
    b = f.y;
  }
  if (fix) {
    if (fabsf(a) < kHalfMinNormal) a = round_f16_subnormal(a);
    if (fabsf(b) < kHalfMinNormal) b = round_f16_subnormal(b);
  }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

struct Params {
  const uint8_t* x;
  const AppendTile* tiles;
  AppendStepTiles step;  // step.seqs set: tiles computed (append_tile_at)
  int n_tiles;
  int n_heads;
  int round_to;  // DType
  uint8_t* pool;
  size_t page_bytes;
  size_t region_offset;
  int page_tokens;
  int* status;
  int out_offset;  // shared-memory offsets (bytes) of the record staging
  int bnd_offset;  // and of the boundaries (binary search)
  int sign_offset;  // and of the rotation's signs, per lane's part of a vector (2 or 4 threads a vector)
  AppendFormat fmt;
};

template <int D, DType IN>
struct Geo {
  static constexpr int kSz = IN == DType::f32 ? 4 : 2;
  static constexpr int kE = append_elems_per_thread(D);  // elements per thread
  static constexpr int kV = D / kE;                      // threads per vector
  static constexpr int kThreads = append_threads(D);     // threads per block
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kRows = kThreads / kV;            // vectors per tile
  static constexpr int kSlice = kE * kSz + 16;           // padded slice in shared memory
  static constexpr int kChunksPerSlice = kE * kSz / 16;
  static constexpr int kChunksPerRow = D * kSz / 16;
  // Sign words of one lane's part of a vector in shared memory (2 or 4
  // threads a vector: the part is the lane's, so a constant-bank index would
  // be a register, i.e. an LDC per word): f32 input one word per element, else
  // one per pair; + 16 bytes so that the parts' 16-byte reads fall in
  // different banks.
  static constexpr int kSignHalfBytes = (IN == DType::f32 ? kE : kE / 2) * 4 + 16;
  static_assert(kV == 1 || kV == 2 || kV == 4, "1, 2 or 4 threads per vector");
};

// cp.async of a tile's rows into the per-thread slices (slice = row * V + q).
// Thread t always copies the same 16-byte column k of a row (rows t / CPR,
// + 128 / CPR, ...): addresses step by constants; a division only where a
// tile takes part of the heads (n_heads above the tile's rows).
template <int D, DType IN>
__device__ __forceinline__ void issue_tile(const Params& p, const AppendTile& t, uint8_t* in) {
  using G = Geo<D, IN>;
  constexpr int kCpr = G::kChunksPerRow, kRowStep = G::kThreads / kCpr;
  constexpr int kIters = (G::kRows + kRowStep - 1) / kRowStep;
  static_assert(G::kThreads % kCpr == 0, "whole rows per pass");
  const int rows = int(t.n) * t.nh;
  const int k = threadIdx.x % kCpr, r0 = threadIdx.x / kCpr;
  uint8_t* dst = in + (r0 * G::kV + k / G::kChunksPerSlice) * G::kSlice + (k % G::kChunksPerSlice) * 16;
  if (t.nh == p.n_heads) {  // rows contiguous in the input
    const uint8_t* src = p.x + (size_t(t.token0) * p.n_heads + r0) * (D * G::kSz) + k * 16;
#pragma unroll
    for (int i = 0; i < kIters; ++i)
      if (r0 + i * kRowStep < rows)
        cp_async16(dst + i * kRowStep * G::kV * G::kSlice, src + size_t(i) * kRowStep * (D * G::kSz));
  } else {
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int r = r0 + i * kRowStep;
      if (r < rows) {
        const size_t row = size_t(t.token0 + r / t.nh) * p.n_heads + t.h0 + r % t.nh;
        cp_async16(dst + i * kRowStep * G::kV * G::kSlice, p.x + row * (D * G::kSz) + k * 16);
      }
    }
  }
  cp_async_commit();
}

// (b < v) as 0 or 1: the sign of fl(b - v). Exact for finite v and b that is
// finite or +inf: with gradual underflow b - v rounds to 0 only when b == v,
// and then to +0; b is never -0 (append_format stores a -0 boundary as +0).
// One FADD and, with the add of the base, one LEA.HI.
__device__ __forceinline__ unsigned lt01(float b, float v) {
  return __float_as_uint(__fsub_rn(b, v)) >> 31;
}

// Code of v (see AppendSearch).
template <int BITS, int MODE>
__device__ __forceinline__ unsigned code_of(float v, float cell_scale, float tb0, float tb1,
                                            int tbase, const float* sbnd) {
  if constexpr (MODE == int(AppendSearch::binary)) {
    int lo = 0;
#pragma unroll
    for (int k = BITS - 1; k >= 0; --k) {  // step 2^(BITS-1), ..., 1 over 2^BITS - 1 bounds
      const int step = 1 << k;
      if (sbnd[lo + step - 1] < v) lo += step;
    }
    return unsigned(lo);
  } else {
    const float t = __fmaf_rn(v, cell_scale, kMagic);
    const int lane = __viaddmin_s32_relu(__float_as_int(t), 16 - kMagicBits, 31);
    const float b0 = __shfl_sync(kFull, tb0, lane);
    const unsigned base = unsigned(__shfl_sync(kFull, tbase, lane));
    if constexpr (MODE == int(AppendSearch::table2)) {
      const float b1 = __shfl_sync(kFull, tb1, lane);
      return base + lt01(b0, v) + lt01(b1, v);
    } else {
      return base + lt01(b0, v);
    }
  }
}

// Codes of C consecutive elements (registers x[0..C)), packed as the CPU's
// pack_ref packs them: stream bit k is bit k % BITS of code k / BITS, 32-bit
// little-endian words. Fields do not overlap, so += is |=.
template <int BITS, int MODE, int C>
__device__ __forceinline__ void quantize_pack(const float* x, float post_scale, float mul,
                                              float cell_scale, float tb0, float tb1, int tbase,
                                              const float* sbnd, unsigned* words) {
  static_assert(C * BITS % 32 == 0, "whole words per chunk");
#pragma unroll
  for (int w = 0; w < C * BITS / 32; ++w) words[w] = 0;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const float y = __fmul_rn(x[i], post_scale);
    const float v = __fmul_rn(y, mul);
    const unsigned code = code_of<BITS, MODE>(v, cell_scale, tb0, tb1, tbase, sbnd);
    const int pos = i * BITS, w = pos / 32, sh = pos % 32;
    words[w] += code << sh;
    if (sh + BITS > 32) words[w + 1] += code >> (32 - sh);
  }
}

// Writes N words at a 2-byte aligned shared address (records are even-sized,
// so only 2-byte alignment holds for every record).
template <int N>
__device__ __forceinline__ void store_words_u16(uint8_t* dst, const unsigned* words) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma unroll
  for (int w = 0; w < N; ++w) {
    d[2 * w] = static_cast<uint16_t>(words[w] & 0xffffu);
    d[2 * w + 1] = static_cast<uint16_t>(words[w] >> 16);
  }
}

// The norm's 16 partial sums in index order: acc[j] = x[j]^2 + x[16 + j]^2
// + ... (the CPU's canonical order; kernels_ref.cpp).
template <int E>
__device__ __forceinline__ void sq_partials16(const float* x, float* acc) {
#pragma unroll
  for (int j = 0; j < 16; ++j) acc[j] = __fmul_rn(x[j], x[j]);  // 0 + x^2 == x^2
#pragma unroll
  for (int m = 1; m < E / 16; ++m)
#pragma unroll
    for (int j = 0; j < 16; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(x[16 * m + j], x[16 * m + j]));
}
// Their sum by the tree w = 8, 4, 2, 1. (Loops count up or down by one: nvcc
// does not unroll w /= 2, and an array indexed in a loop it does not unroll
// goes to local memory.)
__device__ __forceinline__ float tree16(float* acc) {
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = __fadd_rn(acc[j], acc[j + 8]);
#pragma unroll
  for (int j = 0; j < 4; ++j) acc[j] = __fadd_rn(acc[j], acc[j + 4]);
#pragma unroll
  for (int j = 0; j < 2; ++j) acc[j] = __fadd_rn(acc[j], acc[j + 2]);
  return __fadd_rn(acc[0], acc[1]);
}
// Walsh-Hadamard butterflies of strides 1, 2, .. E/2 on E registers, in the
// CPU's order (a + b, a - b; unnormalised).
template <int E>
__device__ __forceinline__ void fwht_rn(float* x) {
#pragma unroll
  for (int lh = 0; (1 << lh) < E; ++lh) {
    const int h = 1 << lh;
#pragma unroll
    for (int p2 = 0; p2 < E / 2; ++p2) {  // butterfly p2: j = (p2 / h) * 2h + p2 % h
      const int j = (p2 >> lh) * 2 * h + (p2 & (h - 1));
      const float a = x[j], b = x[j + h];
      x[j] = __fadd_rn(a, b);
      x[j + h] = __fsub_rn(a, b);
    }
  }
}

// A tile's records, staged per head h as the run out_stage + h * run_stride +
// (dest(h) & 15) of len bytes (len = n records; run_stride = (len + 31) &
// ~15), to their pages: per head one contiguous run, 16-byte stores where
// whole, 2-byte ones at its ends (records are even-sized); warps over heads.
template <class Dest>
__device__ __forceinline__ void copy_runs_out(const uint8_t* out_stage, int run_stride, int len, int nh, int warp,
                                              int n_warps, int lane, Dest&& dest) {
  for (int h = warp; h < nh; h += n_warps) {
    uint8_t* const g = dest(h);
    const int head = int(reinterpret_cast<uintptr_t>(g) & 15);
    uint8_t* const g0 = g - head;  // 16-byte aligned
    const uint8_t* const s0 = out_stage + h * run_stride;
    const int n_chunks = (head + len + 15) / 16;
    for (int j = lane; j < n_chunks; j += 32) {
      const int lo = j == 0 ? head : 0, hi = min(16, head + len - 16 * j);
      if (lo == 0 && hi == 16) {
        *reinterpret_cast<uint4*>(g0 + 16 * j) = *reinterpret_cast<const uint4*>(s0 + 16 * j);
      } else {
        for (int b = lo; b < hi; b += 2)
          *reinterpret_cast<uint16_t*>(g0 + 16 * j + b) = *reinterpret_cast<const uint16_t*>(s0 + 16 * j + b);
      }
    }
  }
}

// Resident blocks the register budget aims at. head_dim 128 and 256
// (256-thread blocks, 64 elements a thread): 2 (128 registers; f16 input
// spills 16 bytes there, on its bf16-rounding path). head_dim 64 (128-thread
// blocks, a vector a thread): 3 (168 registers) with 16-bit input and a table
// search, else 2 (255 registers). (Checked with -Xptxas -v.)
template <int D, DType IN, int MODE>
constexpr int append_min_blocks() {
  const bool table = MODE != int(AppendSearch::binary);
  if (D >= 128) return 2;
  return table && IN != DType::f32 ? 3 : 2;
}

template <int D, int BITS, DType IN, int MODE>
__global__ void __launch_bounds__(append_threads(D), (append_min_blocks<D, IN, MODE>()))
    mse_append_kernel(const __grid_constant__ Params p) {
  using G = Geo<D, IN>;
  constexpr int E = G::kE, V = G::kV;
  constexpr int C = E;  // elements per packed chunk: a thread packs its own elements
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* const in_stage = smem;
  uint8_t* const out_stage = smem + p.out_offset;
  float* const sbnd = reinterpret_cast<float*>(smem + p.bnd_offset);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int r = tid / V, q = tid % V;  // row of the tile, half of the vector
  const AppendFormat& F = p.fmt;
  const int rb = F.f.record_bytes;
  if (MODE == int(AppendSearch::binary))
    for (int i = tid; i < (1 << BITS) - 1; i += G::kThreads) sbnd[i] = F.f.boundaries[i];
  // This lane's part of the signs (read after the first tile's barrier).
  const unsigned* const ssign = reinterpret_cast<const unsigned*>(smem + p.sign_offset + q * G::kSignHalfBytes);
  if constexpr (V > 1) {
    constexpr int kHalfWords = (G::kSignHalfBytes - 16) / 4;
    for (int i = tid; i < V * kHalfWords; i += G::kThreads) {
      const int h = i / kHalfWords, k = i % kHalfWords;
      *reinterpret_cast<unsigned*>(smem + p.sign_offset + h * G::kSignHalfBytes + 4 * k) =
          IN == DType::f32 ? F.sign_f32[i] : F.sign_pair[i];
    }
  }
  const float tb0 = F.tab.b0[lane], tb1 = F.tab.b1[lane];
  const int tbase = F.tab.base[lane];

  int ti = blockIdx.x;
  if (ti < p.n_tiles) issue_tile<D, IN>(p, append_tile_at(p.tiles, p.step, ti), in_stage);
  for (; ti < p.n_tiles; ti += gridDim.x) {
    const AppendTile t = append_tile_at(p.tiles, p.step, ti);
    const int n = t.n, nh = t.nh, rows = n * nh;
    const bool valid = r < rows;
    cp_async_wait_all();
    __syncthreads();

    // ---- this thread's slice: raw words, then floats with the signs -------
    constexpr int kWords = E * G::kSz / 4;
    unsigned raw[kWords];
    load_words16<kWords>(reinterpret_cast<const uint4*>(in_stage + tid * G::kSlice), raw);
    __syncthreads();  // the slices are read: the next tile may land there
    if (ti + int(gridDim.x) < p.n_tiles) issue_tile<D, IN>(p, append_tile_at(p.tiles, p.step, ti + gridDim.x), in_stage);

    // Sign flips commute with the roundings below (RNE is symmetric), so
    // they are applied first, to the raw bits.
    float x[E];
    int st = 0;
    if constexpr (IN == DType::f32) {
      // NaN/Inf and (f16) values KvCache's dense encoder refuses are found
      // before the rounding can hide them; |x| < 2^-14 rounds to the
      // subnormal halves (rare: a second conversion variant).
      const int rt = p.round_to;
      bool tiny = false;
      if (rt != int(DType::f32)) {
        const float limit = rt == int(DType::f16) ? kHalfMax : 3.402823466e38f;
        bool flag = false;
        float mn = INFINITY;
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const float a = fabsf(__uint_as_float(raw[i]));
          flag |= !(a <= limit);
          mn = fminf(mn, a);
        }
        if (flag)
#pragma unroll
          for (int i = 0; i < E; ++i) {
            const float a = fabsf(__uint_as_float(raw[i]));
            if (!(a <= 3.402823466e38f)) st |= kStatusNonFinite;
            else if (a > limit) st |= kStatusDenseOverflow;
          }
        tiny = rt == int(DType::f16) && __any_sync(kFull, mn < kHalfMinNormal);
      }
      auto convert = [&](int how) {  // 0 none, 1 f16 normal, 2 f16 any, 3 bf16
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const unsigned s = V == 1 ? F.sign_f32[i] : ssign[i];
          float a = __uint_as_float(raw[i] ^ s);
          if (how == 1) a = round_f16_normal(a);
          else if (how == 2) a = fabsf(a) < kHalfMinNormal ? round_f16_subnormal(a) : round_f16_normal(a);
          else if (how == 3) a = round_bf16(a);
          x[i] = a;
        }
      };
      if (rt == int(DType::f32)) convert(0);
      else if (rt == int(DType::bf16)) convert(3);
      else if (tiny) convert(2);
      else convert(1);
    } else {
      // bf16 rounded to f16: exact but for |x| < 2^-14 (subnormal halves) and
      // |x| > 65504 (refused, found from the norm below). Whether any element
      // of the warp is that small is one bf16x2 min per pair; the fix runs
      // only then (zeros take it too: rare in K/V).
      bool tiny = false;
      if (IN == DType::bf16 && p.round_to == int(DType::f16))
        tiny = __any_sync(kFull, bf16_pairs_below_f16_normal<E / 2>(raw));
      auto convert = [&](bool fix) {
#pragma unroll
        for (int j = 0; j < E / 2; ++j) {
          const unsigned s = V == 1 ? F.sign_pair[j] : ssign[j];
          pair_to_floats<IN == DType::bf16>(raw[j] ^ s, fix, x[2 * j], x[2 * j + 1]);
        }
      };
      if (tiny) convert(true);
      else convert(false);
    }

    // f16 input, bf16 layer format: round each value. A NaN stays a NaN (the
    // rounding's carry could reach the sign bit of a NaN payload and make it
    // -0), so that the norm refuses it; inf stays inf.
    if (IN == DType::f16 && p.round_to == int(DType::bf16)) {
#pragma unroll
      for (int i = 0; i < E; ++i)
        if (!isnan(x[i])) x[i] = round_bf16(x[i]);
    }
    const bool f16_from_bf16 = IN == DType::bf16 && p.round_to == int(DType::f16);

    // ---- norm: 16 partial sums in index order, then the tree ----------------
    float acc[16];
    sq_partials16<E>(x, acc);
    // Lane q holds elements Eq ..: its partial sums continue those of lane
    // q - 1 (the order of additions is the CPU's). Round k makes lane k's
    // sums right (every lane computes; lanes past k are redone later, lanes
    // before k are not read again), so the last lane ends with the CPU's.
#pragma unroll
    for (int k = 1; k < V; ++k)
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        float a = V == 2 ? __shfl_xor_sync(kFull, acc[j], 1) : __shfl_up_sync(kFull, acc[j], 1, V);
#pragma unroll
        for (int m = 0; m < E / 16; ++m) a = __fadd_rn(a, __fmul_rn(x[16 * m + j], x[16 * m + j]));
        acc[j] = a;
      }
    float ss = tree16(acc);
    if constexpr (V > 1) ss = __shfl_sync(kFull, ss, lane | (V - 1));
    if (f16_from_bf16 && !(ss < kHalfMax * kHalfMax)) {
      // Some |x| may exceed 65504 (bf16 keeps such values; x^2 <= ss): find
      // out which (rare: needs a norm >= 65504).
#pragma unroll
      for (int i = 0; i < E; ++i) {
        if (!isfinite(x[i])) st |= kStatusNonFinite;
        else if (fabsf(x[i]) > kHalfMax) st |= kStatusDenseOverflow;
      }
    }
    const bool finite = isfinite(ss);
    if (!finite) st |= kStatusNonFinite;
    const float norm = __fsqrt_rn(ss);
    const float mul = __fdiv_rn(1.0f, norm);
    const unsigned keep = finite && norm != 0.0f ? ~0u : 0u;  // zero vector: codes 0

    // ---- rotation: FWHT in registers -----------------------------------------
    fwht_rn<E>(x);
    // Lane q holds elements Eq + rho; the stages h = E lm (lm = 1, 2 .. V/2)
    // pair lane q with q ^ lm: a + b on the lane whose bit lm is clear, a - b
    // on the other, each as fma(+-1, own, partner's): +-own is exact, so the
    // one rounding is the CPU's (signed zeros included).
#pragma unroll
    for (int lm = 1; lm < V; lm *= 2) {
      const float sgn = (q & lm) ? -1.0f : 1.0f;
#pragma unroll
      for (int i = 0; i < E; ++i) x[i] = __fmaf_rn(sgn, x[i], __shfl_xor_sync(kFull, x[i], lm));
    }

    // ---- codes, packed ------------------------------------------------------
    constexpr int kChunkWords = C * BITS / 32;
    unsigned words[kChunkWords];
    const float ps = F.f.post_scale, cs = F.tab.cell_scale;
    quantize_pack<BITS, MODE, C>(x, ps, mul, cs, tb0, tb1, tbase, sbnd, words);
#pragma unroll
    for (int w = 0; w < kChunkWords; ++w) words[w] &= keep;

    // ---- records into the staging area, laid out like their destination ----
    const int tl = valid ? r / nh : 0, hl = valid ? r % nh : 0;
    const int run_stride = (n * rb + 31) & ~15;  // >= n * rb + the offset mod 16
    auto dest = [&](int h) {  // first record of head h of the tile
      return p.pool + size_t(t.page) * p.page_bytes + p.region_offset +
             (size_t(t.h0 + h) * p.page_tokens + t.slot0) * rb;
    };
    if (valid) {
      uint8_t* rec = out_stage + hl * run_stride + (reinterpret_cast<uintptr_t>(dest(hl)) & 15) + tl * rb;
      store_words_u16<kChunkWords>(rec + q * (C * BITS / 8), words);  // elements Eq ..
      if (q == 0) {
        uint16_t* sp = reinterpret_cast<uint16_t*>(rec + F.f.code_bytes);
        if (F.f.scale_f32) {
          const unsigned u = __float_as_uint(norm);
          sp[0] = static_cast<uint16_t>(u & 0xffffu);
          sp[1] = static_cast<uint16_t>(u >> 16);
        } else {
          if (!(norm <= kHalfMax) && finite) st |= kStatusScaleOverflow;
          sp[0] = static_cast<uint16_t>(float_to_half_bits(norm));
        }
      }
      if (st) atomicOr(p.status, st);
    }
    __syncthreads();

    // ---- out: per head one contiguous run of n records, 16-byte stores ------
    copy_runs_out(out_stage, run_stride, n * rb, nh, warp, G::kWarps, lane, dest);
  }
  append_step_block_done(p.step, append_tiles_of_block(p.n_tiles), 2 * p.n_tiles, p.status);
}

template <int D, int BITS, DType IN, int MODE>
void launch_typed(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t stream) {
  using G = Geo<D, IN>;
  Params p;
  p.x = static_cast<const uint8_t*>(a.x);
  p.tiles = a.tiles;
  p.step = a.step;
  p.n_tiles = a.n_tiles;
  p.n_heads = a.n_heads;
  p.round_to = int(a.round_to);
  p.pool = a.region.pool;
  p.page_bytes = a.region.page_bytes;
  p.region_offset = a.region.region_offset;
  p.page_tokens = a.region.page_tokens;
  p.status = a.status;
  const int in_bytes = G::kThreads * G::kSlice;
  const int heads = std::min(a.n_heads, G::kRows);
  const int out_bytes = (G::kRows * fmt.f.record_bytes + 32 * heads + 15) & ~15;
  p.out_offset = in_bytes;
  p.bnd_offset = in_bytes + out_bytes;
  p.sign_offset = p.bnd_offset + (MODE == int(AppendSearch::binary) ? 256 * 4 : 0);
  const int smem = p.sign_offset + (G::kV > 1 ? G::kV * G::kSignHalfBytes : 0);
  p.fmt = fmt;
  const void* kernel = reinterpret_cast<const void*>(&mse_append_kernel<D, BITS, IN, MODE>);
  const int grid = std::min(a.n_tiles, append_blocks_per_sm(kernel, smem, G::kThreads) * append_sm_count());
  mse_append_kernel<D, BITS, IN, MODE><<<grid, G::kThreads, smem, stream>>>(p);
  TQ_CUDA_CHECK_LAUNCH();
}

// The search modes instantiated: table1 for 1-4 bits, table2 for 5, binary
// for all (append_format picks; a table that does not fit falls back).
template <int D, int BITS, DType IN>
void launch_mode(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t s) {
  if constexpr (BITS <= 4)
    if (fmt.tab.search == AppendSearch::table1) return launch_typed<D, BITS, IN, int(AppendSearch::table1)>(a, fmt, s);
  if constexpr (BITS == 5)
    if (fmt.tab.search == AppendSearch::table2) return launch_typed<D, BITS, IN, int(AppendSearch::table2)>(a, fmt, s);
  launch_typed<D, BITS, IN, int(AppendSearch::binary)>(a, fmt, s);
}

template <int D, DType IN>
void launch_bits(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t s) {
  switch (fmt.f.bits) {
    case 1: return launch_mode<D, 1, IN>(a, fmt, s);
    case 2: return launch_mode<D, 2, IN>(a, fmt, s);
    case 3: return launch_mode<D, 3, IN>(a, fmt, s);
    case 4: return launch_mode<D, 4, IN>(a, fmt, s);
    case 5: return launch_mode<D, 5, IN>(a, fmt, s);
    case 6: return launch_mode<D, 6, IN>(a, fmt, s);
    case 7: return launch_mode<D, 7, IN>(a, fmt, s);
    case 8: return launch_mode<D, 8, IN>(a, fmt, s);
  }
  TQ_ASSERT(false);
}

template <DType IN>
void launch_dtype(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t s) {
  TQ_ASSERT(a.dtype == IN);
  switch (fmt.f.dim) {
    case 64: return launch_bits<64, IN>(a, fmt, s);
    case 128: return launch_bits<128, IN>(a, fmt, s);
    case 256: return launch_bits<256, IN>(a, fmt, s);
  }
  TQ_ASSERT(false);
}

}  // namespace
}  // namespace tq::cuda
