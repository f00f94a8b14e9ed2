// Decode attention over the dense tokens a GPU KV layer keeps outside its
// pages (GpuKvLayerConfig::dense_prefix / dense_window): f16 rows in the
// original domain, at most prefix + window of them per sequence.
//
// Few tokens (132 by default), so the cost is latency, not bandwidth: the
// first version (one block per query head walking 32-token chunks
// serially) took ~51 us for 132 tokens at Llama 1 x 32K, more than the
// whole page kernel. Here the work is spread so that one load round trip
// and a few short phases remain:
//  - grid (KV head x head block, sequence, token split): each block takes
//    kChunk<D> consecutive dense tokens of one sequence for a block of the
//    GQA group's query heads (every K/V row it stages serves all of them),
//    and writes a normalised partial (output, lse); the split merge joins
//    the splits after its inverse V rotation;
//  - all of a block's K and V rows are copied to shared memory at once with
//    16-byte cp.async (every thread has its loads in flight together);
//  - a thread per (head, token) computes a logit (whole dot product, no
//    shuffle chains: v4 scored a token per warp with a shuffle reduction per
//    head and spent most of its ~17k cycles per block there), one warp per
//    head takes the max and the sum, and each thread then accumulates its
//    own (head, coordinate) outputs.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "cuda/cuda_check.hpp"
#include "cuda/kernels.hpp"
#include "cuda/launch.cuh"

namespace tq::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kNegInf = -INFINITY;

// Tokens per block: 16 KB of K and 16 KB of V rows in shared memory.
// Measured against half of it (32 at d 128; H200, 128 + 4 dense tokens):
// batch 1 got slower (Llama 1 x 32K +5.7 us over no dense tokens, against
// +2.5 us here: more blocks for the few SMs the page kernel leaves free)
// and batch 8 no faster (+7.1 against +8.2 us, Gemma +9.1 against +8.6).
template <int D>
constexpr int kChunk = 8192 / D;
// Query heads per block: outputs per thread <= kHeads * D / kThreads (8).
template <int D>
constexpr int kHeads = D == 64 ? 16 : 2048 / D;

__device__ __forceinline__ void cp_async16(void* sdst, const void* gsrc) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(sdst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gsrc) : "memory");
}
__device__ __forceinline__ void cp_async4(void* sdst, const void* gsrc) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(sdst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gsrc) : "memory");
}

__device__ __forceinline__ float2 half2_bits_to_float2(unsigned u) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    decode_dense_part_kernel(DecodeAttentionParams p, const float* __restrict__ q) {
  constexpr int C = kChunk<D>, HB = kHeads<D>, kOut = HB * D / kThreads;
  // K rows padded by 16 bytes: a warp's threads read 16-byte pieces of 32
  // different rows at the same column, and the pad spreads them over the banks.
  constexpr int KS = D + 8;
  static_assert(HB * D % kThreads == 0 && kOut <= 8);
  __shared__ __align__(16) uint16_t ks[C * KS], vs[C * D];
  __shared__ __align__(16) float qs[HB * D];
  __shared__ float sc[HB * C];  // logits, then weights
  __shared__ float s_m[HB], s_l[HB];

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent of the page kernel (sm_90): the
  // merge may launch at once too; it waits on the device for this grid.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  const DenseTokens& dt = p.dense;
  float* __restrict__ out_o = p.dense_o;
  float* __restrict__ out_lse = p.dense_lse;
  const int n_hblocks = (p.group + HB - 1) / HB;
  const int hkv = blockIdx.x / n_hblocks, hb = blockIdx.x % n_hblocks;
  const int seq = blockIdx.y, split = blockIdx.z, n_splits = gridDim.z;
  const int h0 = hb * HB, nh = min(HB, p.group - h0);  // query heads hkv*group + h0 ..
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int n_heads_q = p.n_heads_kv * p.group;
  const size_t r0 = size_t(seq) * n_heads_q + hkv * p.group + h0;  // first query head's row

  // 1. The queries (their loads need no state), then the rows (token t of
  // the dense part: the prefix, then the window ring oldest first), all
  // asynchronous: two dependent round trips in all (state, then rows).
  for (int idx = tid; idx < nh * D; idx += kThreads) cp_async4(qs + idx, q + r0 * D + idx);
  const int n_pre = dt.state[seq * 3], win_start = dt.state[seq * 3 + 1],
            win_count = dt.state[seq * 3 + 2];
  const int n_main = p.lengths[seq];
  const int n = n_pre + win_count;
  const int q_pos = n_pre + n_main + win_count - 1;
  const int t0 = split * C, cnt = max(0, min(C, n - t0));
  const int slots = dt.prefix_slots + dt.window_slots;
  const size_t row = size_t(p.n_heads_kv) * D;  // halves per slot
  constexpr int kVecs = D / 8;  // 16-byte pieces per row
  for (int idx = tid; idx < cnt * kVecs; idx += kThreads) {
    const int j = idx / kVecs, c = idx % kVecs, t = t0 + j;
    const int slot = t < n_pre ? t : dt.prefix_slots + (win_start + (t - n_pre)) % dt.window_slots;
    const size_t g = (size_t(seq) * slots + slot) * row + size_t(hkv) * D + c * 8;
    cp_async16(ks + j * KS + c * 8, dt.k + g);
    cp_async16(vs + j * D + c * 8, dt.v + g);
  }
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  __syncthreads();

  // 2. Logits: a thread per (head, token), the whole dot product in the
  // thread (no shuffle chains), four accumulators.
#pragma unroll 1
  for (int idx = tid; idx < nh * cnt; idx += kThreads) {
    const int h = idx / cnt, j = idx % cnt, t = t0 + j;
    const uint4* kr = reinterpret_cast<const uint4*>(ks + j * KS);
    const float4* qh = reinterpret_cast<const float4*>(qs + h * D);
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma unroll 4
    for (int c = 0; c < D / 8; ++c) {
      const uint4 kk = kr[c];
      const float4 qa = qh[2 * c], qb = qh[2 * c + 1];
      const float2 f0 = half2_bits_to_float2(kk.x), f1 = half2_bits_to_float2(kk.y);
      const float2 f2 = half2_bits_to_float2(kk.z), f3 = half2_bits_to_float2(kk.w);
      a0 += qa.x * f0.x + qa.y * f0.y;
      a1 += qa.z * f1.x + qa.w * f1.y;
      a2 += qb.x * f2.x + qb.y * f2.y;
      a3 += qb.z * f3.x + qb.w * f3.y;
    }
    const int pos = t < n_pre ? t : n_pre + n_main + (t - n_pre);
    const bool live = pos < dt.sinks || p.window <= 0 || q_pos - pos < p.window;
    float logit = ((a0 + a1) + (a2 + a3)) * p.sm_scale;
    if (p.softcap > 0.0f) logit = p.softcap * tanhf(logit / p.softcap);
    sc[h * C + j] = live ? logit : kNegInf;
  }
  __syncthreads();

  // 3. Per head: max, weights, sum (a warp per head).
#pragma unroll 1
  for (int h = warp; h < nh; h += kWarps) {
    float mx = kNegInf;
    for (int j = lane; j < cnt; j += 32) mx = fmaxf(mx, sc[h * C + j]);
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float l = 0.0f;
    for (int j = lane; j < cnt; j += 32) {
      const float s = sc[h * C + j];
      const float w = s == kNegInf ? 0.0f : expf(s - mx);
      sc[h * C + j] = w;
      l += w;
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) l += __shfl_xor_sync(0xffffffffu, l, off);
    if (lane == 0) {
      s_m[h] = mx;
      s_l[h] = l;
    }
  }
  __syncthreads();

  // 4. Outputs: thread tid owns (head, coordinate) pairs tid + k * kThreads;
  // a warp's 32 share a head (D >= 64), so the weight is a broadcast and
  // the V reads are consecutive halves. Two accumulators.
#pragma unroll 1
  for (int k = 0; k < kOut; ++k) {
    const int idx = tid + k * kThreads, h = idx / D, d = idx % D;
    if (h >= nh) break;
    const float* w = sc + h * C;
    float o0 = 0.0f, o1 = 0.0f;
    int j = 0;
#pragma unroll 4
    for (; j + 1 < cnt; j += 2) {
      o0 += w[j] * __half2float(__ushort_as_half(vs[j * D + d]));
      o1 += w[j + 1] * __half2float(__ushort_as_half(vs[(j + 1) * D + d]));
    }
    if (j < cnt) o0 += w[j] * __half2float(__ushort_as_half(vs[j * D + d]));
    const float l = s_l[h];
    const size_t r = (r0 + h) * n_splits + split;
    out_o[r * D + d] = l > 0.0f ? (o0 + o1) / l : 0.0f;
    if (d == 0) out_lse[r] = l > 0.0f ? s_m[h] + logf(l) : kNegInf;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The merge waits for this grid only: it must not finish before the page
  // kernel's partials are written and visible (a no-op without a primary).
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

template <int D>
void launch_dense_part(const DecodeAttentionParams& p, const float* q, cudaStream_t stream,
                       bool overlap) {
  const int n_hblocks = (p.group + kHeads<D> - 1) / kHeads<D>;
  launch_maybe_dependent(decode_dense_part_kernel<D>, dim3(p.n_heads_kv * n_hblocks, p.n_seqs, p.dense_splits),
                         dim3(kThreads), stream, overlap, p, q);
}

}  // namespace

int decode_dense_part_splits(int head_dim, int dense_slots) {
  if (dense_slots <= 0) return 0;
  const int c = head_dim == 64 ? kChunk<64> : head_dim == 128 ? kChunk<128> : kChunk<256>;
  return (dense_slots + c - 1) / c;
}

void launch_decode_dense_part(const DecodeAttentionParams& p, const float* q, CUstream_st* stream,
                              bool overlap) {
  if (p.n_seqs == 0) return;
  TQ_ASSERT(p.dense_o != nullptr && p.dense_lse != nullptr &&
            p.dense_splits == decode_dense_part_splits(p.k.dim, p.dense.prefix_slots + p.dense.window_slots));
  switch (p.k.dim) {
    case 64: return launch_dense_part<64>(p, q, stream, overlap);
    case 128: return launch_dense_part<128>(p, q, stream, overlap);
    case 256: return launch_dense_part<256>(p, q, stream, overlap);
  }
  TQ_THROW("GPU decode attention: head_dim ", p.k.dim, " is not 64, 128 or 256");
}

}  // namespace tq::cuda
