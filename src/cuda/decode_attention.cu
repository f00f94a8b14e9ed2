// Split-KV decode attention over tq-mse pages (flash-decoding), CUDA cores.
//
// Grid (split, kv head, sequence); each block serves the whole GQA group of
// its KV head, so every record it reads is scored against g query heads:
//  1. the group's queries are rotated in shared memory (the K format's
//     rotation: <Rq, c> * scale = <q, k_hat>);
//  2. tiles of kTile tokens: one warp per token scores it from the codes
//     (lanes split the coordinates, a shuffle reduction per head);
//  3. fp32 online softmax per head (running max m, sum l);
//  4. values accumulate in the V rotation's domain: acc_h += w_hj * scale_j * c_j;
//  5. each split writes its normalised partial output and log-sum-exp.
// A merge kernel joins the splits exactly (the merge_states rule), then maps
// each output back with one inverse rotation.
//
// Correctness first (issue 5, step 1): byte loads from the records and
// shared-memory accumulators. It is the reference (_ref) the tensor-core
// kernel (decode_attention_tc.cu) is tested against, and the fallback for
// what that kernel does not support. This file also holds the dispatch
// (plan_decode_attention, launch_decode_attention) and the merge both share.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "cuda/cuda_check.hpp"
#include "cuda/fwht_registers.cuh"
#include "cuda/io_dtype.cuh"
#include "cuda/kernels.hpp"
#include "cuda/launch.cuh"
#include "cuda/split_rotation.cuh"

namespace tq::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;  // tokens per softmax step
constexpr float kNegInf = -INFINITY;

// Code i of a packed record (little-endian bitstream). The byte after the
// codes is the scale's, so reading two bytes never leaves the record.
__device__ __forceinline__ int code_at(const uint8_t* rec, int i, int bits) {
  const int bit = i * bits;
  const unsigned v = unsigned(rec[bit >> 3]) | (unsigned(rec[(bit >> 3) + 1]) << 8);
  return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

// A little-endian scale (fp16 or f32) at p, unaligned.
__device__ __forceinline__ float scale_bytes_at(const uint8_t* p, int f32) {
  if (f32)
    return __uint_as_float(unsigned(p[0]) | unsigned(p[1]) << 8 | unsigned(p[2]) << 16 |
                           unsigned(p[3]) << 24);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(p[0] | (p[1] << 8))));
}
__device__ __forceinline__ float scale_at(const uint8_t* rec, const MseDeviceFormat& f) {
  return scale_bytes_at(rec + f.code_bytes, f.scale_f32);
}
// The scale of a split record's sub-record.
__device__ __forceinline__ float segment_scale(const uint8_t* rec, const SplitSegment& g) {
  return scale_bytes_at(rec + g.offset + g.code_bytes, g.scale_f32);
}

// In-place normalised FWHT of `rows` vectors of length D in shared memory by
// the whole block (the sign flip is done by the caller where it belongs).
template <int D>
__device__ void block_fwht(float* x, int rows, float post_scale) {
  for (int h = 1; h < D; h *= 2) {
    for (int idx = threadIdx.x; idx < rows * (D / 2); idx += blockDim.x) {
      const int r = idx / (D / 2), p = idx % (D / 2);
      float* v = x + r * D;
      const int j = (p / h) * 2 * h + p % h;
      const float a = v[j], b = v[j + h];
      v[j] = a + b;
      v[j + h] = a - b;
    }
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) x[idx] *= post_scale;
  __syncthreads();
}

// The unnormalised transform of each block of N elements of a row of D held
// one element per thread (blockDim.x == D, thread i holds element i; N = D:
// the whole row, as block_fwht): the stages within a warp (h < 32) by
// shuffles, the rest after one exchange through x (shared, D floats), each
// output built in block_fwht's stage order, so the result is the same bit
// for bit. x is read by other threads until a later barrier.
template <int D, int N>
__device__ __forceinline__ float row_block_fwht(float v, float* x) {
  const int i = threadIdx.x;
#pragma unroll
  for (int h = 1; h < 32 && h < N; h *= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, h);
    v = (i & h) ? o - v : v + o;  // element i - h minus element i, or i plus i + h
  }
  if constexpr (N > 32) {
    constexpr int G = N / 32;  // elements i % 32 + 32 k of the block
    const int base = N == D ? 0 : (i & ~(N - 1));
    x[i] = v;
    __syncthreads();
    float g[G];
#pragma unroll
    for (int k = 0; k < G; ++k) g[k] = x[base + (i & 31) + 32 * k];
    fwht_registers(g);
    v = g[(i - base) >> 5];
  }
  return v;
}
// The whole row's transform times post_scale.
template <int D>
__device__ __forceinline__ float row_fwht(float v, float* x, float post_scale) {
  return row_block_fwht<D, D>(v, x) * post_scale;
}

__device__ __forceinline__ bool key_visible(int q, int k, int window, int n_sinks) {
  if (k > q) return false;
  if (k < n_sinks) return true;
  return window <= 0 || q - k < window;
}

// Centroid table entries a format needs in shared memory: 2^bits, or both
// segments' tables back to back for a channel split.
__host__ __device__ inline int centroid_slots(const MseDeviceFormat& f, const SplitFormat& sp) {
  return sp.n_seg ? (1 << sp.seg[0].bits) + (1 << sp.seg[1].bits) : 1 << f.bits;
}

// SPLIT: K and / or V are channel-split formats (p.k_split / p.v_split):
// the queries are gathered by the head's channels and rotated per segment,
// a score is the sum of the segments' dot products times their scales, and
// the values' weights take each segment's scale.
template <int D, bool SPLIT>
__global__ void __launch_bounds__(kThreads)
    decode_split_kernel(DecodeAttentionParams p, const float* __restrict__ q,
                        float* __restrict__ part_o, float* __restrict__ part_lse) {
  const int split = blockIdx.x, hkv = blockIdx.y, seq = blockIdx.z;
  const int g = p.group, n_heads_q = p.n_heads_kv * g;
  const bool ksp = SPLIT && p.k_split.n_seg != 0, vsp = SPLIT && p.v_split.n_seg != 0;
  extern __shared__ float smem[];
  float* qs = smem;                 // [g, D] rotated queries
  float* acc = qs + g * D;          // [g, D]
  float* sc = acc + g * D;          // [g, kTile] scores, then weights * v scale
  float* m = sc + g * kTile;        // [g]
  float* l = m + g;                 // [g]
  float* corr = l + g;              // [g]
  float* kcent = corr + g;          // [2^kbits] (split: both segments' tables)
  float* vcent = kcent + centroid_slots(p.k, p.k_split);  // [2^vbits] (likewise)
  float* vscale = vcent + centroid_slots(p.v, p.v_split);  // [kTile] (V split: [2, kTile], weights unscaled)

  const int len = p.lengths[seq];
  const int span = p.split_pages * p.page_tokens;
  const int t0 = split * span;
  const int t1 = min(len, t0 + span);
  const size_t out_row = (size_t(seq) * n_heads_q + size_t(hkv) * g) * p.n_splits + split;
  if (t0 >= t1) {  // an empty split is neutral in the merge
    for (int h = threadIdx.x; h < g; h += blockDim.x) part_lse[out_row + size_t(h) * p.n_splits] = kNegInf;
    for (int idx = threadIdx.x; idx < g * D; idx += blockDim.x) {
      const int h = idx / D, i = idx % D;
      part_o[(out_row + size_t(h) * p.n_splits) * D + i] = 0.0f;
    }
    return;
  }

  const float* qg = q + (size_t(seq) * n_heads_q + size_t(hkv) * g) * D;
  if (ksp) {
    const int* ch = p.k_split.channels + size_t(hkv) * D;
    for (int idx = threadIdx.x; idx < g * D; idx += blockDim.x) qs[idx] = qg[(idx / D) * D + ch[idx % D]];
    for (int c = threadIdx.x; c < (1 << p.k_split.seg[0].bits); c += blockDim.x)
      kcent[c] = p.k_split.seg[0].centroids[c];
    for (int c = threadIdx.x; c < (1 << p.k_split.seg[1].bits); c += blockDim.x)
      kcent[(1 << p.k_split.seg[0].bits) + c] = p.k_split.seg[1].centroids[c];
  } else {
    for (int idx = threadIdx.x; idx < g * D; idx += blockDim.x) qs[idx] = qg[idx] * p.k.signs[idx % D];
    for (int c = threadIdx.x; c < (1 << p.k.bits); c += blockDim.x) kcent[c] = p.k.centroids[c];
  }
  if (vsp) {
    for (int c = threadIdx.x; c < (1 << p.v_split.seg[0].bits); c += blockDim.x)
      vcent[c] = p.v_split.seg[0].centroids[c];
    for (int c = threadIdx.x; c < (1 << p.v_split.seg[1].bits); c += blockDim.x)
      vcent[(1 << p.v_split.seg[0].bits) + c] = p.v_split.seg[1].centroids[c];
  } else {
    for (int c = threadIdx.x; c < (1 << p.v.bits); c += blockDim.x) vcent[c] = p.v.centroids[c];
  }
  for (int h = threadIdx.x; h < g; h += blockDim.x) {
    m[h] = kNegInf;
    l[h] = 0.0f;
  }
  __syncthreads();
  if (ksp) {
    // Rotate each segment of the gathered queries (acc is the scratch, zeroed below).
    const int n0 = p.k_split.seg[0].dim;
    SegmentRotator{p.k_split.seg[0].rot, qs, acc, g, D}.forward();
    SegmentRotator{p.k_split.seg[1].rot, qs + n0, acc + n0, g, D}.forward();
  } else {
    block_fwht<D>(qs, g, p.k.post_scale);
  }
  for (int idx = threadIdx.x; idx < g * D; idx += blockDim.x) acc[idx] = 0.0f;
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q_pos = len - 1 + p.window_tail;  // dense window tokens follow the pages
  const int* ptab = p.page_table + size_t(seq) * p.max_pages_per_seq;
  const size_t k_region = 0, v_region = p.v_region_offset;
  auto record = [&](int t, size_t region, int rec_bytes) {
    const int page = ptab[t / p.page_tokens], slot = t % p.page_tokens;
    return p.pool + size_t(page) * p.page_bytes + region +
           (size_t(hkv) * p.page_tokens + slot) * rec_bytes;
  };

  for (int tile = t0; tile < t1; tile += kTile) {
    // 1. Scores: warp w takes tokens w, w + kWarps, ... of the tile.
    for (int tt = warp; tt < kTile; tt += kWarps) {
      const int t = tile + tt;
      const bool live = t < t1 && key_visible(q_pos, t, p.window, p.n_sinks);
      if (!live) {  // uniform across the warp
        if (lane < g) sc[lane * kTile + tt] = kNegInf;
        for (int h = 32 + lane; h < g; h += 32) sc[h * kTile + tt] = kNegInf;
        if (lane == 0) vscale[tt] = 0.0f;
        if (vsp && lane == 0) vscale[kTile + tt] = 0.0f;
        continue;
      }
      const uint8_t* krec = record(t, k_region, p.k.record_bytes);
      if (ksp) {
        // Coordinates below n0 are segment 0's: two partial dot products.
        const SplitSegment& s0 = p.k_split.seg[0];
        const SplitSegment& s1 = p.k_split.seg[1];
        const int n0 = s0.dim, t1 = 1 << s0.bits;
        float c[D / 32];
#pragma unroll
        for (int r = 0; r < D / 32; ++r) {
          const int i = lane + 32 * r;
          c[r] = i < n0 ? kcent[code_at(krec + s0.offset, i, s0.bits)]
                        : kcent[t1 + code_at(krec + s1.offset, i - n0, s1.bits)];
        }
        const float ks0 = segment_scale(krec, s0), ks1 = segment_scale(krec, s1);
        for (int h = 0; h < g; ++h) {
          float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
          for (int r = 0; r < D / 32; ++r) {
            const float x = qs[h * D + lane + 32 * r] * c[r];
            if (lane + 32 * r < n0) a0 += x;
            else a1 += x;
          }
#pragma unroll
          for (int o = 16; o >= 1; o /= 2) {
            a0 += __shfl_xor_sync(0xffffffffu, a0, o);
            a1 += __shfl_xor_sync(0xffffffffu, a1, o);
          }
          if (lane == 0) {
            float logit = (a0 * ks0 + a1 * ks1) * p.sm_scale;
            if (p.softcap > 0.0f) logit = p.softcap * tanhf(logit / p.softcap);
            sc[h * kTile + tt] = logit;
          }
        }
      } else {
        float c[D / 32];
#pragma unroll
        for (int r = 0; r < D / 32; ++r) c[r] = kcent[code_at(krec, lane + 32 * r, p.k.bits)];
        const float ks = scale_at(krec, p.k);
        for (int h = 0; h < g; ++h) {
          float s = 0.0f;
#pragma unroll
          for (int r = 0; r < D / 32; ++r) s += qs[h * D + lane + 32 * r] * c[r];
#pragma unroll
          for (int o = 16; o >= 1; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
          if (lane == 0) {
            float logit = s * ks * p.sm_scale;
            if (p.softcap > 0.0f) logit = p.softcap * tanhf(logit / p.softcap);
            sc[h * kTile + tt] = logit;
          }
        }
      }
      if (lane == 0) {
        const uint8_t* vrec = record(t, v_region, p.v.record_bytes);
        if (vsp) {
          vscale[tt] = segment_scale(vrec, p.v_split.seg[0]);
          vscale[kTile + tt] = segment_scale(vrec, p.v_split.seg[1]);
        } else {
          vscale[tt] = scale_at(vrec, p.v);
        }
      }
    }
    __syncthreads();
    // 2. Online softmax, one thread per head.
    for (int h = threadIdx.x; h < g; h += blockDim.x) {
      float* s = sc + h * kTile;
      float mx = kNegInf;
      for (int j = 0; j < kTile; ++j) mx = fmaxf(mx, s[j]);
      const float m_new = fmaxf(m[h], mx);
      if (m_new == kNegInf) {  // nothing visible yet
        corr[h] = 1.0f;
        for (int j = 0; j < kTile; ++j) s[j] = 0.0f;
        continue;
      }
      const float cr = expf(m[h] - m_new);  // 0 when m was -inf
      float sum = 0.0f;
      for (int j = 0; j < kTile; ++j) {
        const float w = s[j] == kNegInf ? 0.0f : expf(s[j] - m_new);
        sum += w;
        s[j] = vsp ? w : w * vscale[j];  // a split's weights take each segment's scale below
      }
      l[h] = l[h] * cr + sum;
      m[h] = m_new;
      corr[h] = cr;
    }
    __syncthreads();
    // 3. Values: each thread owns coordinates i = tid, tid + kThreads, ...
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      for (int h = 0; h < g; ++h) acc[h * D + i] *= corr[h];
      const int n = min(kTile, t1 - tile);
      if (vsp) {
        const SplitSegment& s0 = p.v_split.seg[0];
        const SplitSegment& s1 = p.v_split.seg[1];
        const bool hi = i < s0.dim;
        const float* vs = vscale + (hi ? 0 : kTile);
        for (int tt = 0; tt < n; ++tt) {
          if (vs[tt] == 0.0f) continue;  // masked (or a zero sub-vector: adds nothing)
          const uint8_t* vrec = record(tile + tt, v_region, p.v.record_bytes);
          const float cv = hi ? vcent[code_at(vrec + s0.offset, i, s0.bits)]
                              : vcent[(1 << s0.bits) + code_at(vrec + s1.offset, i - s0.dim, s1.bits)];
          const float x = vs[tt] * cv;
          for (int h = 0; h < g; ++h) acc[h * D + i] += sc[h * kTile + tt] * x;
        }
        continue;
      }
      for (int tt = 0; tt < n; ++tt) {
        if (vscale[tt] == 0.0f) continue;  // masked (or a zero vector: adds nothing)
        const float cv = vcent[code_at(record(tile + tt, v_region, p.v.record_bytes), i, p.v.bits)];
        for (int h = 0; h < g; ++h) acc[h * D + i] += sc[h * kTile + tt] * cv;
      }
    }
    __syncthreads();
  }

  for (int idx = threadIdx.x; idx < g * D; idx += blockDim.x) {
    const int h = idx / D, i = idx % D;
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    part_o[(out_row + size_t(h) * p.n_splits) * D + i] = acc[idx] * inv;
  }
  for (int h = threadIdx.x; h < g; h += blockDim.x)
    part_lse[out_row + size_t(h) * p.n_splits] = l[h] > 0.0f ? m[h] + logf(l[h]) : kNegInf;
}

// One block of D threads per (query head, sequence): merge the splits, then
// the inverse V rotation R^T = D H / sqrt(D): FWHT, scale, signs.
//
// The partials are L2 hits, so at batch 1 the merge is bound by load
// latency, not bandwidth: the split lse are spread over the block (one load
// each) and part_o is read in batches of kMergeBatch independent loads per
// thread. Each thread still sums its column in split order, so the result is
// the serial merge's bit for bit (up to the sign of a zero).
constexpr int kMergeTile = 256;  // splits whose weights sit in shared memory at once
constexpr int kMergeBatch = 32;  // part_o loads in flight per thread

template <int D, bool SPLIT>
__global__ void __launch_bounds__(D)
    decode_merge_kernel(DecodeAttentionParams p, const float* part_o, const float* part_lse,
                        void* __restrict__ out, float* __restrict__ lse) {
  static_assert(D % 32 == 0 && kMergeTile % kMergeBatch == 0);
  // The V signs do not come from the split kernel: read before the wait, so
  // their latency overlaps that kernel instead of following it.
  const bool split_v = SPLIT && p.v_split.n_seg != 0;
  const float v_sign = split_v ? 0.0f : p.v.signs[threadIdx.x];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent of the split kernel (sm_90): it may
  // start while that kernel runs; wait for its partials. A no-op otherwise.
  // (part_o / part_lse are not __restrict__: nvcc would read them with
  // ld.global.nc and may hoist such a load above this wait, before the
  // partials exist -- a lab variant's were: merge_speculative_loads.patch.)
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  __shared__ float x[D];
  __shared__ float s_w[kMergeTile];  // lse, then weights, of one tile of splits
  __shared__ float s_red[D / 32];
  const int hq = blockIdx.x, seq = blockIdx.y, i = threadIdx.x;
  const int n_heads_q = p.n_heads_kv * p.group;
  // The partials' stride is p.n_splits; a device plan wrote the first n of
  // them (its count is read after the wait: the split kernel stored it). The
  // lse loads below do not wait for that count: every slot up to the stride
  // is read and those past n count as empty.
  const int n = p.device_plan != nullptr ? __ldcg(p.device_plan) : p.n_splits;
  const size_t row = (size_t(seq) * n_heads_q + hq) * p.n_splits;

  // Max over all splits; the first tile's lse is kept for its weights.
  float mx = kNegInf;
  for (int s = i; s < p.n_splits; s += D) {
    const float raw = part_lse[row + s];
    const float ls = s < n ? raw : kNegInf;
    mx = fmaxf(mx, ls);
    if (s < kMergeTile) s_w[s] = ls;
  }
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if (i % 32 == 0) s_red[i / 32] = mx;
  __syncthreads();
  mx = kNegInf;
#pragma unroll
  for (int w = 0; w < D / 32; ++w) mx = fmaxf(mx, s_red[w]);

  float o = 0.0f, sum = 0.0f;
  if (mx != kNegInf) {  // the same for the whole block
    for (int t0 = 0; t0 < n; t0 += kMergeTile) {
      const int cnt = min(kMergeTile, n - t0);
      if (t0 > 0) __syncthreads();  // the previous tile's weights are read
      // Padding past cnt gets weight 0, so the batches below need no bound.
      for (int k = i; k < kMergeTile; k += D) {
        const float ls = k >= cnt ? kNegInf : t0 == 0 ? s_w[k] : part_lse[row + t0 + k];
        s_w[k] = ls == kNegInf ? 0.0f : expf(ls - mx);
      }
      __syncthreads();
      // Software pipelined: batch b + 1 is in flight while batch b is summed.
      // With loads and uses in one basic block ptxas interleaves them and
      // keeps only a few loads in flight. An empty split's part_o was never
      // written: a zero weight skips the load.
      const float* po = part_o + (row + t0) * D + i;
      float v[kMergeBatch];
#pragma unroll
      for (int k = 0; k < kMergeBatch; ++k) v[k] = s_w[k] != 0.0f ? po[size_t(k) * D] : 0.0f;
      for (int b = 0; b < cnt; b += kMergeBatch) {
        float nv[kMergeBatch];
        if (b + kMergeBatch < cnt) {
#pragma unroll
          for (int k = 0; k < kMergeBatch; ++k) {
            const int s = b + kMergeBatch + k;
            nv[k] = s_w[s] != 0.0f ? po[size_t(s) * D] : 0.0f;
          }
        }
        // Unpredicated: a skipped split adds w = 0 and 0 * 0, which changes
        // nothing (predicates would also cap the loads in flight).
#pragma unroll
        for (int k = 0; k < kMergeBatch; ++k) {
          const float w = s_w[b + k];
          sum += w;
          o += w * v[k];
        }
#pragma unroll
        for (int k = 0; k < kMergeBatch; ++k) v[k] = nv[k];
      }
    }
    o /= sum;
  }
  float val;
  if (split_v) {
    // Each segment's inverse rotation, then element j of [seg 0 | seg 1]
    // goes back to its channel.
    __shared__ float y[D];
    const SplitFormat& f = p.v_split;
    float r;
    if (f.halves(D)) {  // turbo2.5 / turbo3.5: one barrier, as the unsplit row
      const int h = i >= D / 2 ? 1 : 0;
      const SegmentRotation& R = f.seg[h].rot;
      r = row_block_fwht<D, D / 2>(o, x) * R.block_scale[0] * __ldg(R.signs1 + i - h * (D / 2));
    } else {
      x[i] = o;
      __syncthreads();
      SegmentRotator{f.seg[0].rot, x, y, 1, D}.inverse();
      SegmentRotator{f.seg[1].rot, x + f.seg[0].dim, y + f.seg[0].dim, 1, D}.inverse();
      r = x[i];
    }
    y[f.channels[size_t(hq / p.group) * D + i]] = r;
    __syncthreads();
    val = y[i];
  } else {
    val = row_fwht<D>(o, x, p.v.post_scale) * v_sign;
  }
  float ls = mx == kNegInf ? kNegInf : mx + logf(sum);
  if (p.dense_o != nullptr) {  // join the dense tokens' splits (original domain)
    const size_t r = (size_t(seq) * n_heads_q + hq) * p.dense_splits;
    float M = ls;
#pragma unroll 4
    for (int s = 0; s < p.dense_splits; ++s) M = fmaxf(M, p.dense_lse[r + s]);
    if (M == kNegInf) {
      val = 0.0f;
    } else {
      float w = ls == kNegInf ? 0.0f : expf(ls - M);
      float acc = w * val, sum = w;
      for (int s = 0; s < p.dense_splits; ++s) {
        const float ld = p.dense_lse[r + s];
        if (ld == kNegInf) continue;  // an empty split's output is 0, never NaN
        w = expf(ld - M);
        acc += w * p.dense_o[(r + s) * D + i];
        sum += w;
      }
      val = acc / sum;
      ls = M + logf(sum);
    }
  }
  io_store(out, (size_t(seq) * n_heads_q + hq) * D + i, val, p.out_dtype);
  if (lse != nullptr && i == 0) lse[size_t(seq) * n_heads_q + hq] = ls;
}

// A 16-bit query widened to f32 (DecodeAttentionParams::q_f32): exact, so
// the decode kernels see the values of the f16 / bf16 query.
// The tensor-core kernel launches as its programmatic dependent (sm_90) and
// waits for it before its first read of q, after its own prologue.
__global__ void convert_query_kernel(const void* __restrict__ q, int dtype, float* __restrict__ q_f32, size_t n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) q_f32[i] = io_load(q, i, dtype);
}

template <int D>
void launch_merge(const DecodeAttentionParams& p, const float* part_o, const float* part_lse,
                  void* out, float* lse, cudaStream_t stream, bool overlap) {
  const dim3 grid(p.n_heads_kv * p.group, p.n_seqs);
  if (p.v_split.n_seg != 0)
    launch_maybe_dependent(decode_merge_kernel<D, true>, grid, dim3(D), stream, overlap, p, part_o, part_lse,
                           out, lse);
  else
    launch_maybe_dependent(decode_merge_kernel<D, false>, grid, dim3(D), stream, overlap, p, part_o,
                           part_lse, out, lse);
}

template <int D, bool SPLIT>
void launch_split_kernel(const DecodeAttentionParams& p, const float* q, float* part_o, float* part_lse,
                         size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024)
    TQ_CUDA_CHECK(cudaFuncSetAttribute(decode_split_kernel<D, SPLIT>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(p.n_splits, p.n_heads_kv, p.n_seqs);
  decode_split_kernel<D, SPLIT><<<grid, kThreads, smem, stream>>>(p, q, part_o, part_lse);
  TQ_CUDA_CHECK_LAUNCH();
}

template <int D>
void launch_ref(const DecodeAttentionParams& p, const float* q, float* part_o, float* part_lse,
                void* out, float* lse, cudaStream_t stream) {
  const int g = p.group;
  const bool split = p.k_split.n_seg != 0 || p.v_split.n_seg != 0;
  const size_t smem =
      sizeof(float) * (size_t(2 * g * D) + g * kTile + 3 * g + centroid_slots(p.k, p.k_split) +
                       centroid_slots(p.v, p.v_split) + 2 * kTile);
  if (split) launch_split_kernel<D, true>(p, q, part_o, part_lse, smem, stream);
  else launch_split_kernel<D, false>(p, q, part_o, part_lse, smem, stream);
  if (p.dense_o != nullptr) launch_decode_dense_part(p, q, stream, false);
  launch_merge<D>(p, part_o, part_lse, out, lse, stream, false);
}

std::atomic<int> g_kernel_override{static_cast<int>(DecodeKernel::automatic)};
std::atomic<int> g_split_planning{static_cast<int>(SplitPlanning::automatic)};

int ref_splits(const DecodeAttentionParams& p) {
  return (p.max_pages_per_seq + p.split_pages - 1) / p.split_pages;
}

}  // namespace

const char* to_string(DecodeKernel k) {
  switch (k) {
    case DecodeKernel::automatic: return "automatic";
    case DecodeKernel::reference: return "reference";
    case DecodeKernel::tensor_core: return "tensor_core";
  }
  return "?";
}

void set_decode_kernel_override(DecodeKernel k) { g_kernel_override = static_cast<int>(k); }
DecodeKernel decode_kernel_override() { return static_cast<DecodeKernel>(g_kernel_override.load()); }
void set_decode_split_planning(SplitPlanning mode) { g_split_planning = static_cast<int>(mode); }
SplitPlanning decode_split_planning() { return static_cast<SplitPlanning>(g_split_planning.load()); }

DecodeShape decode_shape(const DecodeAttentionParams& p) {
  DecodeShape s;
  s.head_dim = p.k.dim;
  s.k_bits = p.k.bits;
  s.v_bits = p.v.bits;
  s.k_scale_f32 = p.k.scale_f32 != 0;
  s.v_scale_f32 = p.v.scale_f32 != 0;
  s.group = p.group;
  s.page_tokens = p.page_tokens;
  s.k_split = p.k_split.n_seg != 0;
  s.v_split = p.v_split.n_seg != 0;
  s.kv_one_codebook = p.kv_one_codebook != 0;
  // Two halves of D / 2 channels at b and b - 1 bits, one-round rotations,
  // fp16 scales, the lo record right after the hi one.
  auto halves = [&](const SplitFormat& f) {
    const SplitSegment &hi = f.seg[0], &lo = f.seg[1];
    if (!f.halves(s.head_dim)) return false;
    for (const SplitSegment* g : {&hi, &lo})
      if (g->scale_f32 || g->code_bytes * 8 != g->dim * g->bits) return false;
    return lo.bits == hi.bits - 1 && hi.offset == 0 && lo.offset == hi.code_bytes + 2;
  };
  if (s.k_split && s.v_split && halves(p.k_split) && halves(p.v_split) &&
      p.k_split.seg[0].bits == p.v_split.seg[0].bits && p.k.record_bytes == p.v.record_bytes) {
    s.split_halves = true;
    s.k_bits = s.v_bits = p.k_split.seg[0].bits;
  }
  // Outlier channels in K beside a plain V: [hi: dim/8 channels][lo: the
  // rest], fp16 scales, each sub-record's codes tightly packed, lo right
  // after hi (any rotation: the queries are rotated per segment first).
  if (s.k_split && !s.v_split) {
    const SplitSegment &hi = p.k_split.seg[0], &lo = p.k_split.seg[1];
    bool ok = hi.dim == s.head_dim / 8 && lo.dim == s.head_dim - hi.dim && hi.offset == 0 &&
              lo.offset == hi.code_bytes + 2 && p.k.record_bytes == lo.offset + lo.code_bytes + 2;
    for (const SplitSegment* g : {&hi, &lo})
      ok = ok && !g->scale_f32 && g->code_bytes * 8 == g->dim * g->bits;
    if (ok) {
      s.k_outlier = true;
      s.k_bits = lo.bits;
      s.k_hi_bits = hi.bits;
    }
  }
  return s;
}

DecodeKernel decode_kernel_for(const DecodeShape& s) {
  switch (decode_kernel_override()) {
    case DecodeKernel::reference: return DecodeKernel::reference;
    case DecodeKernel::tensor_core: {
      const char* why = decode_tc_unsupported(s);
      TQ_REQUIRE(why == nullptr, "GPU decode attention: the tensor-core kernel was asked for, "
                 "but it cannot run this shape: ", why);
      return DecodeKernel::tensor_core;
    }
    case DecodeKernel::automatic: break;
  }
  // The explicit fallback: anything the tensor-core kernel does not cover
  // (other bit widths, f32 scales, group > 8, odd page sizes, a device with
  // too little shared memory) runs the reference kernel.
  return decode_tc_unsupported(s) == nullptr ? DecodeKernel::tensor_core : DecodeKernel::reference;
}

int decode_max_splits(const DecodeAttentionParams& p) {
  int n = ref_splits(p);
  if (decode_tc_unsupported(decode_shape(p)) == nullptr)
    n = std::max(n, decode_tc_max_splits(p));
  return n;
}

void plan_decode_attention(DecodeAttentionParams& p, const int* host_lengths) {
  p.kernel = decode_kernel_for(decode_shape(p));
  if (p.kernel == DecodeKernel::tensor_core) {
    // A device plan (the caller's device_plan words) bounds the kernel's
    // choice: splits of at least the shortest split the host could plan, at
    // most as many as that leaves (the partials' stride). A pinned split
    // (set_decode_tc_split_override) is planned here.
    const int device_min = p.device_plan != nullptr ? decode_tc_device_plan_min_split(p) : 0;
    if (device_min == 0) p.device_plan = nullptr;
    p.split_tokens = device_min > 0 ? device_min : decode_tc_split_tokens(p, host_lengths);
    const long span = decode_split_span_cap(p);
    p.n_splits = int((span + p.split_tokens - 1) / p.split_tokens);
    TQ_ASSERT(p.n_splits <= decode_tc_max_splits(p));
  } else {
    p.device_plan = nullptr;  // (the reference kernel's splits do not depend on the lengths)
    p.split_tokens = p.split_pages * p.page_tokens;
    p.n_splits = ref_splits(p);
  }
}

void launch_decode_merge(const DecodeAttentionParams& p, const float* partial_o,
                         const float* partial_lse, void* out, float* lse, CUstream_st* stream,
                         bool overlap) {
  if (p.n_seqs == 0) return;
  switch (p.k.dim) {
    case 64: return launch_merge<64>(p, partial_o, partial_lse, out, lse, stream, overlap);
    case 128: return launch_merge<128>(p, partial_o, partial_lse, out, lse, stream, overlap);
    case 256: return launch_merge<256>(p, partial_o, partial_lse, out, lse, stream, overlap);
  }
  TQ_THROW("GPU decode attention: head_dim ", p.k.dim, " is not 64, 128 or 256");
}

void launch_decode_attention_ref(const DecodeAttentionParams& p, const float* q, float* partial_o,
                                 float* partial_lse, void* out, float* lse, CUstream_st* stream) {
  if (p.n_seqs == 0) return;
  TQ_ASSERT(p.n_splits == ref_splits(p));
  switch (p.k.dim) {
    case 64: return launch_ref<64>(p, q, partial_o, partial_lse, out, lse, stream);
    case 128: return launch_ref<128>(p, q, partial_o, partial_lse, out, lse, stream);
    case 256: return launch_ref<256>(p, q, partial_o, partial_lse, out, lse, stream);
  }
  TQ_THROW("GPU decode attention: head_dim ", p.k.dim, " is not 64, 128 or 256");
}

void launch_decode_attention(const DecodeAttentionParams& p, const void* q, float* partial_o,
                             float* partial_lse, void* out, float* lse, CUstream_st* stream) {
  const float* qf = static_cast<const float*>(q);
  if (p.q_dtype != int(DType::f32) && p.n_seqs > 0) {
    TQ_ASSERT(p.q_f32 != nullptr);
    const size_t n = size_t(p.n_seqs) * p.n_heads_kv * p.group * p.k.dim;
    constexpr int kThreadsConvert = 256;
    convert_query_kernel<<<unsigned((n + kThreadsConvert - 1) / kThreadsConvert), kThreadsConvert, 0, stream>>>(
        q, p.q_dtype, p.q_f32, n);
    TQ_CUDA_CHECK_LAUNCH();
    qf = p.q_f32;
  }
  switch (p.kernel) {
    case DecodeKernel::tensor_core:
      return launch_decode_attention_tc(p, qf, partial_o, partial_lse, out, lse, stream);
    case DecodeKernel::reference:
      return launch_decode_attention_ref(p, qf, partial_o, partial_lse, out, lse, stream);
    case DecodeKernel::automatic: break;
  }
  TQ_THROW("GPU decode attention: launch without a plan (call plan_decode_attention first)");
}

}  // namespace tq::cuda
