// The append of a captured decode step (GpuKvLayer::append_step_device) for
// tq-mse K and V: one token per sequence of the batch, K and V in one launch,
// one warp per vector. Same codes and scales as mse_append_kernel.cuh, which
// remains the specification's fast path for prefill blocks; the arithmetic
// here is the same sequence of _rn operations (see mse_append.cu), compiled
// with -fmad=false.
//
// Why a kernel of its own: a step holds 8-256 vectors, and the prefill
// kernel gives each vector two threads of a 256-thread block, so a batch-1
// step ran one warp's work through ~1,500 dependent instructions a thread
// while the block's idle warps computed garbage rows beside it (the step
// took ~6.5 us of device time beyond its graph launch). Here a vector is a
// warp: head_dim / 32 elements a lane, the rotation's high stages by
// shuffles, the norm's 16 partial sums over shared memory in the CPU's order.
// On a layer with dense tokens each warp also plans its row from the
// device's state of the sequence (no planning kernel; DenseStepRows), and
// launch_dense_step_finish (src/cuda/dense_rows.cu) moves the new rows in
// after the commit.
// Channel splits in two halves (turbo2.5, turbo3.5: SplitFormat::halves)
// take the same kernel with a warp per half (SPLIT): the half's channels
// gathered from the row, its signs, one Hadamard block and its scale, its
// table, its sub-record -- split_append.cu's arithmetic.
// Outlier channels in K beside a tq-mse V (turbo4-out, paper_mse-out:
// StepParamsOut) take it too: a warp per K vector runs
// outlier_append_kernel's arithmetic (each segment from lane 0, the
// canonical 16-lane norms, warp_rotate_regs, the CPU's binary search), a
// warp per V vector the tq-mse path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/cuda_check.hpp"
#include "cuda/mse_append.hpp"
#include "cuda/mse_append_kernel.cuh"  // float_to_half_bits, round_bf16, lt01, kMagic: the same arithmetic
#include "cuda/split_encode.cuh"
#include "cuda/split_rotation.cuh"

#include <type_traits>

namespace tq::cuda {
namespace {

constexpr int kStepWarps = 4;  // warps (vectors) per block

struct StepCommon {
  AppendStepTiles step;     // seqs, n, lengths, limits, page table, done, sticky, active
  const uint8_t* x[2];      // K, V input: [n, n_heads, dim] of dtype
  int dtype, round_to;
  int n_heads;
  uint8_t* pool;
  size_t page_bytes;
  size_t region_offset[2];  // K, V
  int page_tokens;
  int* status;              // the step's status word
  DenseStepRows dense;      // dense.state null: no dense tokens
};
// The formats, K then V: tq-mse (AppendFormat), or two halves (SPLIT).
template <bool SPLIT>
struct StepParams : StepCommon {
  AppendFormat fmt[2];
};
template <>
struct StepParams<true> : StepCommon {
  SplitFormat split[2];
  SplitSearch search[2];
  int record_bytes[2];
};
// Outlier channels in K (a split whose first segment has <= 32 channels),
// tq-mse V (fmt[1]; fmt[0] repeats it, unused).
struct StepParamsOut : StepParams<false> {
  SplitFormat kout;
  int k_record_bytes;
  int kout_std;  // kout has the OutlierStd layout with 6-bit outliers: segment 1's bits (3 or 4); else 0
};

// Element i of a row as a float (f32, f16 or bf16 input).
__device__ __forceinline__ float load_elem(const uint8_t* row, int dtype, int i) {
  if (dtype == int(DType::f32)) return reinterpret_cast<const float*>(row)[i];
  const unsigned short u = reinterpret_cast<const unsigned short*>(row)[i];
  if (dtype == int(DType::f16)) return __half2float(__ushort_as_half(u));
  return __uint_as_float(unsigned(u) << 16);
}

// x rounded to the layer's format as KvCache rounds a token to its dense
// format (src/util/half.cpp), with what that format refuses OR'd into st.
// A value beyond the f16 range keeps its value (the step is refused; the
// flag is the one the prefill kernel raises).
__device__ __forceinline__ float round_input(float a, int round_to, int& st) {
  if (round_to == int(DType::f32)) return a;  // non-finite values show in the norm
  if (!isfinite(a)) {
    st |= kStatusNonFinite;
    return a;
  }
  if (round_to == int(DType::bf16)) return round_bf16(a);
  if (fabsf(a) > kHalfMax) {
    st |= kStatusDenseOverflow;
    return a;
  }
  return __half2float(__ushort_as_half(static_cast<unsigned short>(float_to_half_bits(a))));
}

// One K vector of an outlier split (p.kout), by one warp, as
// outlier_append_kernel encodes it: lane l holds element l of segment 0 and
// elements l + 32 k of segment 1, read through the head's channels from
// `row` (dtype), rounded; rec0: its record. The rotation's parameters and
// both segments' boundaries are in shared memory (staged by the block).
template <int D>
__device__ __forceinline__ void outlier_step_vector(const StepParamsOut& p, const uint8_t* row, int dtype, int h,
                                                    uint8_t* rec0, uint8_t* codes, float* scratch,
                                                    const float (&bnd)[2][256], const OutlierElem* elems, int lane,
                                                    int& st) {
  constexpr int EL = D / 32;
  const SplitFormat& F = p.kout;
  const int n0 = F.seg[0].dim, n1 = D - n0;
  const int* ch = F.channels + size_t(h) * D;
  float x0[1] = {lane < n0 ? round_input(load_elem(row, dtype, __ldg(ch + lane)), p.round_to, st) : 0.0f};
  float x1[EL];
#pragma unroll
  for (int k = 0; k < EL; ++k)
    x1[k] = lane + 32 * k < n1 ? round_input(load_elem(row, dtype, __ldg(ch + n0 + lane + 32 * k)), p.round_to, st)
                               : 0.0f;
  float norm0, norm1;
  if constexpr (D == 128 || D == 256) {
    if (p.kout_std != 0) {  // the -out presets: the prefill kernel's unrolled encoder
      float sg[5];
#pragma unroll
      for (int j = 0; j < 5; ++j) sg[j] = (lane >> j) & 1 ? -1.0f : 1.0f;
      auto std_path = [&](auto b1) {
        constexpr int B1 = decltype(b1)::value;
        outlier_encode_std<D, 6, B1>(x0, x1, bnd[0], bnd[1], elems, F.seg[0].rot, F.seg[1].rot, sg, scratch, codes,
                                     lane, norm0, norm1, st);
        __syncwarp();
        write_outlier_record_std<D, 6, B1>(rec0, F, codes, norm0, norm1, lane, st);
      };
      if (p.kout_std == 4) std_path(std::integral_constant<int, 4>{});
      else std_path(std::integral_constant<int, 3>{});
      return;
    }
  }
  outlier_encode<D>(x0, x1, n0, F.seg[0].bits, F.seg[1].bits, bnd[0], bnd[1], elems, F.seg[0].rot.perm != nullptr,
                    F.seg[1].rot.perm != nullptr, scratch, codes, lane, norm0, norm1, st);
  __syncwarp();
  write_split_record(rec0, F, codes, norm0, norm1, lane, st);
}

// Warp w of block b encodes part v = b * kStepWarps + w: side v / (n * n_heads
// * NSEG) (0 K, 1 V), then row of the batch, head, and (SPLIT) half, the last
// fastest. N: elements of a part (head_dim, or head_dim / 2 for halves).
// P = StepParamsOut: K is an outlier split (outlier_step_vector).
template <int N, int MODE, bool SPLIT, class P = StepParams<SPLIT>>
__global__ void __launch_bounds__(32 * kStepWarps) mse_step_kernel(const __grid_constant__ P p) {
  constexpr bool OUTK = std::is_same_v<P, StepParamsOut>;
  constexpr int E = N / 32;  // elements a lane: i = lane * E + j
  constexpr int NSEG = SPLIT ? 2 : 1, D = N * NSEG;
  __shared__ float sq[kStepWarps][N];
  __shared__ __align__(16) uint8_t codes[kStepWarps][N];  // 16-byte aligned: write_outlier_record_std reads 8 at a time
  __shared__ float sbnd[kStepWarps][256];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Outlier K: the rotations' parameters and the segments' boundaries, once a block.
  struct OutShared {
    float bnd[2][256];
    OutlierElem elems[D];
  };
  __shared__ std::conditional_t<OUTK, OutShared, char> out_sh;
  if constexpr (OUTK) {
    for (int sg = 0; sg < 2; ++sg)
      for (int i = threadIdx.x; i < (1 << p.kout.seg[sg].bits) - 1; i += 32 * kStepWarps)
        out_sh.bnd[sg][i] = p.kout.seg[sg].boundaries[i];
    stage_outlier_elems(p.kout, p.kout.seg[0].dim, D, out_sh.elems);
    __syncthreads();
  }
  const AppendStepTiles& s = p.step;
  const int per_side = s.n * p.n_heads * NSEG;
  const int v = int(blockIdx.x) * kStepWarps + warp;
  if (v < 2 * per_side) {
    const int side = v / per_side, i = (v % per_side) / (p.n_heads * NSEG);
    const int h = (v / NSEG) % p.n_heads, sg = v % NSEG;
    // This part's format: bits, search table, boundaries (binary search),
    // scale after the rotation, where its codes and scale go in the record.
    int bits, code_bytes, scale_f32, rec_bytes, rec_off = 0, tbase;
    float post_scale, cs, tb0, tb1;
    const float* bnd;
    const int* chan = nullptr;  // SPLIT: element j of the half is channel chan[j]
    if constexpr (SPLIT) {
      const SplitSegment& G = p.split[side].seg[sg];
      bits = G.bits;
      code_bytes = G.code_bytes;
      scale_f32 = G.scale_f32;
      rec_bytes = p.record_bytes[side];
      rec_off = G.offset;
      post_scale = G.rot.block_scale[0];
      const SearchTable& T = p.search[side].seg[sg];
      cs = T.cell_scale;
      tb0 = T.b0[lane];
      tb1 = T.b1[lane];
      tbase = T.base[lane];
      bnd = G.boundaries;
      chan = p.split[side].channels + size_t(h) * D + sg * N;
    } else {
      const AppendFormat& F = p.fmt[side];
      bits = F.f.bits;
      code_bytes = F.f.code_bytes;
      scale_f32 = F.f.scale_f32;
      rec_bytes = F.f.record_bytes;
      post_scale = F.f.post_scale;
      cs = F.tab.cell_scale;
      tb0 = F.tab.b0[lane];
      tb1 = F.tab.b1[lane];
      tbase = F.tab.base[lane];
      bnd = F.f.boundaries;
    }
    auto elem_index = [&](int j) {
      if constexpr (SPLIT) return __ldg(chan + lane * E + j);
      else return lane * E + j;
    };
    // The new row first: its address needs nothing from the device.
    const uint8_t* row = p.x[side] + (size_t(i) * p.n_heads + h) * D * (p.dtype == int(DType::f32) ? 4 : 2);
    int dtype = p.dtype;
    float raw[E];
#pragma unroll
    for (int j = 0; j < E; ++j) raw[j] = load_elem(row, dtype, elem_index(j));
    const int seq = s.seqs[i], t = s.lengths[seq];
    bool to_pages = true;
    int st = 0;
    if (p.dense.state != nullptr) {
      // A layer with dense tokens: the new row goes to the prefix or the
      // ring (its values checked as the f16 rows are), and where both are
      // full the row leaving them is the one encoded (the ring's oldest).
      const DenseStepRows& dn = p.dense;
      const int S = dn.prefix_slots, W = dn.window_slots;
      const int n_pre = dn.state[3 * seq], win_start = dn.state[3 * seq + 1], win_count = dn.state[3 * seq + 2];
      to_pages = n_pre >= S && win_count >= W;
#pragma unroll
      for (int j = 0; j < E; ++j) {
        if (!isfinite(raw[j])) st |= kStatusNonFinite;
        else if (fabsf(raw[j]) > kHalfMax) st |= kStatusDenseOverflow;
      }
      if (side == 0 && h == 0 && sg == 0 && lane == 0) dn.active[i] = to_pages ? 1 : 0;
      if (to_pages && W > 0) {
        row = (side ? dn.dense_v : dn.dense_k) +
              ((size_t(seq) * (S + W) + S + win_start) * p.n_heads + h) * D * 2;
        dtype = int(DType::f16);
#pragma unroll
        for (int j = 0; j < E; ++j) raw[j] = load_elem(row, dtype, elem_index(j));
      }
    }
    // The destination (as append_tile_at: nothing stored past the limit or
    // for a row that stays dense).
    const bool store = to_pages && t < s.limits[seq];
    if (OUTK && side == 0) {
      if constexpr (OUTK) {
        if (store) {
          const int page = s.page_table[size_t(seq) * s.max_pages_per_seq + t / s.page_tokens];
          uint8_t* const rec = p.pool + size_t(page) * p.page_bytes + p.region_offset[0] +
                               (size_t(h) * p.page_tokens + t % s.page_tokens) * p.k_record_bytes;
          outlier_step_vector<D>(p, row, dtype, h, rec, codes[warp], sq[warp], out_sh.bnd, out_sh.elems, lane, st);
        }
      }
    } else if (store) {
      const int page = s.page_table[size_t(seq) * s.max_pages_per_seq + t / s.page_tokens];
      uint8_t* const rec = p.pool + size_t(page) * p.page_bytes + p.region_offset[side] +
                           (size_t(h) * p.page_tokens + t % s.page_tokens) * rec_bytes + rec_off;
      if (MODE == int(AppendSearch::binary))
        for (int k = lane; k < (1 << bits) - 1; k += 32) sbnd[warp][k] = bnd[k];

      // Rounded, signs applied (exact: a sign-bit xor, or split_rotation's
      // multiply by +-1), squares for the norm.
      float x[E];
#pragma unroll
      for (int j = 0; j < E; ++j) {
        const float a = round_input(raw[j], p.round_to, st);
        if constexpr (SPLIT)
          x[j] = __fmul_rn(a, __ldg(p.split[side].seg[sg].rot.signs1 + lane * E + j));
        else
          x[j] = __uint_as_float(__float_as_uint(a) ^ p.fmt[side].sign_f32[lane * E + j]);
        sq[warp][lane * E + j] = __fmul_rn(x[j], x[j]);
      }
      __syncwarp();
      // Norm: partial sum j (lane j < 16) over elements j, 16 + j, ... in index
      // order, then the tree w = 8, 4, 2, 1 (tree16 of mse_append_kernel.cuh).
      float acc = sq[warp][lane % 16];
#pragma unroll
      for (int m = 1; m < N / 16; ++m) acc = __fadd_rn(acc, sq[warp][16 * m + lane % 16]);
#pragma unroll
      for (int w = 8; w >= 2; w /= 2) {
        const float o = __shfl_down_sync(kFull, acc, w);
        if (lane < w) acc = __fadd_rn(acc, o);
      }
      const float ss = __shfl_sync(kFull, __fadd_rn(acc, __shfl_down_sync(kFull, acc, 1)), 0);
      const bool finite = isfinite(ss);
      if (!finite) st |= kStatusNonFinite;
      const float norm = __fsqrt_rn(ss);
      const float mul = __fdiv_rn(1.0f, norm);
      const bool keep = finite && norm != 0.0f;  // a zero vector: codes 0

      // Rotation: stages h = 1, 2, .. in the lane's registers, then across lanes
      // (the lower index's lane takes a + b, the upper's a - b, one rounding each).
#pragma unroll
      for (int h = 1; h < E; h *= 2)
#pragma unroll
        for (int j = 0; j < E; ++j)
          if ((j & h) == 0) {
            const float a = x[j], b = x[j + h];
            x[j] = __fadd_rn(a, b);
            x[j + h] = __fsub_rn(a, b);
          }
#pragma unroll
      for (int lm = 1; lm < 32; lm *= 2) {
        const float sgn = (lane & lm) ? -1.0f : 1.0f;
#pragma unroll
        for (int j = 0; j < E; ++j) x[j] = __fmaf_rn(sgn, x[j], __shfl_xor_sync(kFull, x[j], lm));
      }

      // Codes (AppendSearch).
      const float ps = post_scale;
      unsigned cj[E];
#pragma unroll
      for (int j = 0; j < E; ++j) {
        const float val = __fmul_rn(__fmul_rn(x[j], ps), mul);
        unsigned c;
        if constexpr (MODE == int(AppendSearch::binary)) {
          int lo = 0;
          for (int k = bits - 1; k >= 0; --k)
            if (sbnd[warp][lo + (1 << k) - 1] < val) lo += 1 << k;
          c = unsigned(lo);
        } else {
          const float tt = __fmaf_rn(val, cs, kMagic);
          const int cell = __viaddmin_s32_relu(__float_as_int(tt), 16 - kMagicBits, 31);
          c = unsigned(__shfl_sync(kFull, tbase, cell)) + lt01(__shfl_sync(kFull, tb0, cell), val);
          if constexpr (MODE == int(AppendSearch::table2)) c += lt01(__shfl_sync(kFull, tb1, cell), val);
        }
        cj[j] = keep ? c : 0u;
      }
      {
        // Packed as pack_ref packs (stream bit k is bit k % bits of code k /
        // bits), then the scale. Where a lane's E codes fill whole bytes (d
        // 256 at any width, 4-bit codes at d 64 / 128) it stores its own
        // bytes; otherwise the codes are staged in shared memory and each
        // lane packs a byte at a time.
        const int cb = code_bytes;
        if ((E * bits) % 8 == 0) {
          unsigned long long w = 0;
#pragma unroll
          for (int j = 0; j < E; ++j) w |= static_cast<unsigned long long>(cj[j]) << (j * bits);
          const int nb = E * bits / 8;
          for (int b = 0; b < nb; ++b) rec[lane * nb + b] = static_cast<uint8_t>(w >> (8 * b));
        } else {
#pragma unroll
          for (int j = 0; j < E; ++j) codes[warp][lane * E + j] = static_cast<uint8_t>(cj[j]);
          __syncwarp();
        }
        for (int k = lane; (E * bits) % 8 != 0 && k < cb; k += 32) {
          const int i0 = (8 * k) / bits, i1 = min(N - 1, (8 * k + 7) / bits);
          unsigned b = 0;
          for (int e = i0; e <= i1; ++e) {
            const int sh = e * bits - 8 * k;
            const unsigned c = codes[warp][e];
            b |= sh >= 0 ? c << sh : c >> (-sh);
          }
          rec[k] = static_cast<uint8_t>(b & 0xffu);
        }
        unsigned sbits;
        int sbytes;
        if (scale_f32) {
          sbits = __float_as_uint(norm);
          sbytes = 4;
        } else {
          if (!(norm <= kHalfMax) && finite) st |= kStatusScaleOverflow;
          sbits = float_to_half_bits(norm);
          sbytes = 2;
        }
        if (lane < sbytes) rec[cb + lane] = static_cast<uint8_t>((sbits >> (8 * lane)) & 0xffu);
      }
    }  // store
    st = __reduce_or_sync(kFull, unsigned(st));
    if (lane == 0 && st != 0) atomicOr(p.status, st);
  }
  // The block that finishes the step's last vector commits it (one count a block).
  append_step_block_done(s, 1, int(gridDim.x), p.status);
}

template <int N, bool SPLIT, class P>
void launch_mode(const P& p, int grid, AppendSearch mode, cudaStream_t stream) {
  constexpr int kThreads = 32 * kStepWarps;
  switch (mode) {
    case AppendSearch::table1:
      mse_step_kernel<N, int(AppendSearch::table1), SPLIT, P><<<grid, kThreads, 0, stream>>>(p);
      break;
    case AppendSearch::table2:
      mse_step_kernel<N, int(AppendSearch::table2), SPLIT, P><<<grid, kThreads, 0, stream>>>(p);
      break;
    case AppendSearch::binary:
      mse_step_kernel<N, int(AppendSearch::binary), SPLIT, P><<<grid, kThreads, 0, stream>>>(p);
      break;
  }
  TQ_CUDA_CHECK_LAUNCH();
}

// The launch's common part of the parameters.
void set_common(StepCommon& p, const StepLaunch& a) {
  TQ_ASSERT(a.step.seqs != nullptr && a.step.n >= 1);
  p.step = a.step;
  p.x[0] = static_cast<const uint8_t*>(a.k);
  p.x[1] = static_cast<const uint8_t*>(a.v);
  p.dtype = int(a.dtype);
  p.round_to = int(a.round_to);
  p.n_heads = a.n_heads;
  p.pool = a.k_region.pool;
  p.page_bytes = a.k_region.page_bytes;
  p.region_offset[0] = a.k_region.region_offset;
  p.region_offset[1] = a.v_region_offset;
  p.page_tokens = a.k_region.page_tokens;
  p.status = a.status;
  if (a.dense != nullptr) p.dense = *a.dense;
}

}  // namespace

bool mse_step_supported(const AppendFormat& kf, const AppendFormat& vf) {
  return kf.f.dim == vf.f.dim && kf.tab.search == vf.tab.search;
}

void launch_mse_step(const StepLaunch& a, const AppendFormat& kf, const AppendFormat& vf, CUstream_st* stream) {
  TQ_ASSERT(mse_step_supported(kf, vf));
  StepParams<false> p;
  set_common(p, a);
  p.fmt[0] = kf;
  p.fmt[1] = vf;
  const int parts = 2 * a.step.n * a.n_heads;
  const int grid = (parts + kStepWarps - 1) / kStepWarps;
  switch (kf.f.dim) {
    case 64: return launch_mode<64, false>(p, grid, kf.tab.search, stream);
    case 128: return launch_mode<128, false>(p, grid, kf.tab.search, stream);
    case 256: return launch_mode<256, false>(p, grid, kf.tab.search, stream);
  }
  TQ_ASSERT(false);
}

bool outlier_step_supported(const SplitFormat& kf, const AppendFormat& vf, int dim) {
  return kf.n_seg == 2 && !kf.halves(dim) && kf.seg[0].dim <= 32 && vf.f.dim == dim &&
         (dim == 64 || dim == 128 || dim == 256);
}

void launch_outlier_step(const StepLaunch& a, int dim, const SplitFormat& kf, int k_record_bytes,
                         const AppendFormat& vf, CUstream_st* stream) {
  TQ_ASSERT(outlier_step_supported(kf, vf, dim));
  StepParamsOut p;
  set_common(p, a);
  p.fmt[0] = vf;  // (K's parts read kout)
  p.fmt[1] = vf;
  p.kout = kf;
  p.k_record_bytes = k_record_bytes;
  p.kout_std = outlier_std_layout(kf, dim) && kf.seg[0].bits == 6 && (kf.seg[1].bits == 3 || kf.seg[1].bits == 4)
                   ? kf.seg[1].bits
                   : 0;
  const int parts = 2 * a.step.n * a.n_heads;
  const int grid = (parts + kStepWarps - 1) / kStepWarps;
  switch (dim) {
    case 64: return launch_mode<64, false>(p, grid, vf.tab.search, stream);
    case 128: return launch_mode<128, false>(p, grid, vf.tab.search, stream);
    case 256: return launch_mode<256, false>(p, grid, vf.tab.search, stream);
  }
  TQ_ASSERT(false);
}

bool split_step_supported(const SplitFormat& kf, const SplitFormat& vf, const SplitSearch& ks,
                          const SplitSearch& vs, int dim) {
  if (!kf.halves(dim) || !vf.halves(dim)) return false;
  const AppendSearch m = ks.seg[0].search;
  return ks.seg[1].search == m && vs.seg[0].search == m && vs.seg[1].search == m;
}

void launch_split_step(const StepLaunch& a, int dim, const SplitFormat& kf, const SplitFormat& vf,
                       const SplitSearch& ks, const SplitSearch& vs, int k_record_bytes, int v_record_bytes,
                       CUstream_st* stream) {
  TQ_ASSERT(split_step_supported(kf, vf, ks, vs, dim));
  StepParams<true> p;
  set_common(p, a);
  p.split[0] = kf;
  p.split[1] = vf;
  p.search[0] = ks;
  p.search[1] = vs;
  p.record_bytes[0] = k_record_bytes;
  p.record_bytes[1] = v_record_bytes;
  const int parts = 2 * a.step.n * a.n_heads * 2;
  const int grid = (parts + kStepWarps - 1) / kStepWarps;
  const AppendSearch mode = ks.seg[0].search;
  switch (dim) {
    case 64: return launch_mode<32, true>(p, grid, mode, stream);
    case 128: return launch_mode<64, true>(p, grid, mode, stream);
    case 256: return launch_mode<128, true>(p, grid, mode, stream);
  }
  TQ_ASSERT(false);
}

}  // namespace tq::cuda
