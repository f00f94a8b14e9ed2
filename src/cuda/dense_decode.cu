// Dense bf16 decode attention (include/turboquant/cuda.hpp, dense_decode_bf16):
// the baseline the compressed kernels are compared with, so it is written to
// run at the memory limit, not for clarity first.
//
// Split-KV (flash-decoding). Grid (split, KV head x head block, sequence), 128
// threads. A block streams the K/V rows of its token range once and scores
// each row against every query head of its GQA group (up to 8), so K/V bytes
// are read once per KV head whatever the group size.
//
// Work split inside a block: one token row of head_dim bf16 is kTx lanes x one
// 16-byte load (uint4 = 8 bf16): kTx = 8, 16, 32 lanes for d = 64, 128, 256.
// A warp thus holds 32 / kTx rows side by side, and the block kStreams
// independent "streams" of rows, each with its own online-softmax state
// (m, l, acc) in registers. Per step a stream loads kU rows of K and of V
// (all issued before any use: 2 kU 16-byte loads in flight per lane), scores
// the kU rows for its heads (lane partial dots, then a butterfly over the kTx
// lanes), rescales once per step and accumulates P.V. Scores are in log2
// units (q is pre-multiplied by scale * log2 e) so every exponential is one
// ex2. At the end the streams of a warp merge by shuffles, the warps through
// shared memory, and the split writes its normalised output and log2-sum-exp;
// a merge kernel joins the splits (the merge_states rule) unless there is
// only one. Row loads bypass L1 and ask L2 for 256-byte prefetch: each byte is
// used once.
//
// Register budget (d 128, 4 heads): q 32 + acc 32 + loads 32 + scores 16.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/cuda_check.hpp"
#include "turboquant/cuda.hpp"
#include "turboquant/error.hpp"

namespace tq::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadsPerBlock = 8;
constexpr int kMaxSplits = 1024;       // bounds the merge kernel's shared memory
constexpr int kMinSplitTokens = 128;   // a shorter split's merge traffic outweighs its parallelism
constexpr int kMergeThreads = 512;
constexpr int kMergeUnroll = 8;  // part_o loads in flight per merge thread
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

struct Params {
  const uint16_t* k;
  const uint16_t* v;
  const int* lengths;
  const void* q;
  int q_bf16;
  float* out;
  float* lse;
  float* part_o;    // [batch, n_heads_q, n_splits, D] or null (one split: write out directly)
  float* part_lse;  // [batch, n_heads_q, n_splits], log2 units
  int n_heads_q, n_heads_kv, group, n_head_blocks, max_ctx, n_splits, split_tokens;
  float q_mul;  // scale * log2(e)
};

template <int D, int HB>
struct Tile {
  static constexpr int kTx = D / 8;               // lanes per token row
  static constexpr int kRows = 32 / kTx;          // rows side by side in a warp
  static constexpr int kStreams = kWarps * kRows; // independent softmax states per block
  static constexpr int kU = HB <= 4 ? 4 : 2;      // rows per stream per step
  static constexpr int kStep = kStreams * kU;     // tokens per block step
};

// 16 bytes that are read once: no L1 allocation, 256-byte L2 prefetch.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// 8 bf16 -> 8 floats (a bf16 is the top half of a float).
__device__ __forceinline__ void unpack_bf16x8(const uint4& u, float* f) {
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// exp2 of a log2-domain difference, one MUFU op (exp2f adds a denormal
// fix-up around it); ex2.approx(-inf) = +0, which the masking relies on.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <int D, int HB>
__global__ void __launch_bounds__(kThreads) dense_split_kernel(Params p) {
  using T = Tile<D, HB>;
  constexpr int kTx = T::kTx, kU = T::kU;
  const int split = blockIdx.x;
  const int hkv = blockIdx.y / p.n_head_blocks, hblk = blockIdx.y % p.n_head_blocks;
  const int b = blockIdx.z;
  const int h0 = hkv * p.group + hblk * HB;     // first query head served here
  const int nh = min(HB, p.group - hblk * HB);  // live heads (the rest compute zeros)
  const int len = max(0, min(p.lengths[b], p.max_ctx));
  const int t0 = split * p.split_tokens;
  const int t1 = split == p.n_splits - 1 ? len : min(len, t0 + p.split_tokens);
  const size_t row0 = size_t(b) * p.n_heads_q + h0;  // (sequence, head) row of q / out

  __shared__ float s_acc[kWarps][HB][D];
  __shared__ float s_m[kWarps][HB], s_l[kWarps][HB];

  if (t0 >= t1) {  // nothing visible in this split
    if (p.part_o != nullptr) {  // neutral in the merge, which never reads its output
      for (int h = threadIdx.x; h < nh; h += kThreads)
        p.part_lse[(row0 + h) * p.n_splits + split] = kNegInf;
    } else {
      for (int idx = threadIdx.x; idx < nh * D; idx += kThreads) p.out[row0 * D + idx] = 0.0f;
      if (p.lse != nullptr)
        for (int h = threadIdx.x; h < nh; h += kThreads) p.lse[row0 + h] = kNegInf;
    }
    return;
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int stream = warp * T::kRows + lane / kTx;
  const int tx = lane % kTx;  // this lane's 8 coordinates: tx*8 .. tx*8+7

  float q[HB][8];
#pragma unroll
  for (int h = 0; h < HB; ++h) {
    if (h < nh) {
      if (p.q_bf16) {
        const uint4 u =
            *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.q) + (row0 + h) * D + tx * 8);
        unpack_bf16x8(u, q[h]);
      } else {
        const float4* qp =
            reinterpret_cast<const float4*>(static_cast<const float*>(p.q) + (row0 + h) * D + tx * 8);
        const float4 a = qp[0], c = qp[1];
        q[h][0] = a.x, q[h][1] = a.y, q[h][2] = a.z, q[h][3] = a.w;
        q[h][4] = c.x, q[h][5] = c.y, q[h][6] = c.z, q[h][7] = c.w;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) q[h][i] *= p.q_mul;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) q[h][i] = 0.0f;
    }
  }

  float m[HB], l[HB], acc[HB][8];
#pragma unroll
  for (int h = 0; h < HB; ++h) {
    m[h] = kNegInf;
    l[h] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.0f;
  }

  const size_t head_row = (size_t(b) * p.n_heads_kv + hkv) * size_t(p.max_ctx);  // token 0 of the head
  const uint4* kp = reinterpret_cast<const uint4*>(p.k) + head_row * kTx + tx;
  const uint4* vp = reinterpret_cast<const uint4*>(p.v) + head_row * kTx + tx;

  // The loop bound is uniform over the block, so every lane reaches the shuffles.
  for (int base = t0; base < t1; base += T::kStep) {
    uint4 kr[kU], vr[kU];
#pragma unroll
    for (int j = 0; j < kU; ++j) {
      const int t = base + j * T::kStreams + stream;
      if (t < t1) {
        kr[j] = load_stream(kp + size_t(t) * kTx);
        vr[j] = load_stream(vp + size_t(t) * kTx);
      } else {
        kr[j] = make_uint4(0, 0, 0, 0);
        vr[j] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[kU][HB];
#pragma unroll
    for (int j = 0; j < kU; ++j) {
      float kf[8];
      unpack_bf16x8(kr[j], kf);
#pragma unroll
      for (int h = 0; h < HB; ++h) {
        float d = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(q[h][i], kf[i], d);
        s[j][h] = d;
      }
    }
#pragma unroll
    for (int o = kTx / 2; o >= 1; o /= 2)
#pragma unroll
      for (int j = 0; j < kU; ++j)
#pragma unroll
        for (int h = 0; h < HB; ++h) s[j][h] += __shfl_xor_sync(0xffffffffu, s[j][h], o);
#pragma unroll
    for (int j = 0; j < kU; ++j)
      if (base + j * T::kStreams + stream >= t1)
#pragma unroll
        for (int h = 0; h < HB; ++h) s[j][h] = kNegInf;

    float corr[HB];
#pragma unroll
    for (int h = 0; h < HB; ++h) {
      float mx = m[h];
#pragma unroll
      for (int j = 0; j < kU; ++j) mx = fmaxf(mx, s[j][h]);
      const float ms = mx == kNegInf ? 0.0f : mx;  // nothing seen yet: keep everything 0
      corr[h] = ex2(m[h] - ms);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kU; ++j) {
        s[j][h] = ex2(s[j][h] - ms);  // now the weight
        sum += s[j][h];
      }
      l[h] = fmaf(l[h], corr[h], sum);
      m[h] = mx;
    }
#pragma unroll
    for (int j = 0; j < kU; ++j) {
      float vf[8];
      unpack_bf16x8(vr[j], vf);
#pragma unroll
      for (int h = 0; h < HB; ++h)
#pragma unroll
        for (int i = 0; i < 8; ++i)
          acc[h][i] = fmaf(s[j][h], vf[i], j == 0 ? acc[h][i] * corr[h] : acc[h][i]);
    }
  }

  // Merge the streams of a warp: lanes with the same tx, kTx apart.
#pragma unroll
  for (int o = kTx; o < 32; o *= 2) {
#pragma unroll
    for (int h = 0; h < HB; ++h) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[h], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[h], o);
      const float mx = fmaxf(m[h], mo);
      const float ms = mx == kNegInf ? 0.0f : mx;
      const float a = ex2(m[h] - ms), c = ex2(mo - ms);
      l[h] = l[h] * a + lo * c;
      m[h] = mx;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        acc[h][i] = acc[h][i] * a + __shfl_xor_sync(0xffffffffu, acc[h][i], o) * c;
    }
  }
  if (lane < kTx) {
#pragma unroll
    for (int h = 0; h < HB; ++h) {
      float4* dst = reinterpret_cast<float4*>(&s_acc[warp][h][tx * 8]);
      dst[0] = make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
      dst[1] = make_float4(acc[h][4], acc[h][5], acc[h][6], acc[h][7]);
      if (tx == 0) {
        s_m[warp][h] = m[h];
        s_l[warp][h] = l[h];
      }
    }
  }
  __syncthreads();

  // Merge the warps; each thread finishes coordinates of one head.
  for (int idx = threadIdx.x; idx < nh * D; idx += kThreads) {
    const int h = idx / D, i = idx % D;
    float mx = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][h]);
    float sum = 0.0f, o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float e = ex2(s_m[w][h] - mx);  // mx is finite: the split saw a token
      sum = fmaf(s_l[w][h], e, sum);
      o = fmaf(s_acc[w][h][i], e, o);
    }
    const float val = o / sum;
    const float lse2 = mx + log2f(sum);
    if (p.part_o != nullptr) {
      const size_t r = (row0 + h) * p.n_splits + split;
      p.part_o[r * D + i] = val;
      if (i == 0) p.part_lse[r] = lse2;
    } else {
      p.out[(row0 + h) * D + i] = val;
      if (i == 0 && p.lse != nullptr) p.lse[row0 + h] = lse2 * kLn2;
    }
  }
}

// One block per (sequence, query head): joins the splits' partial outputs.
// Split weights exp2(lse_s - max) go to shared memory; then kR rows of
// threads each sum a strided subset of the splits over kC float4 columns,
// and a shared-memory pass adds the rows.
template <int D>
__global__ void __launch_bounds__(kMergeThreads)
    dense_merge_kernel(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                       float* __restrict__ out, float* __restrict__ lse, int n_splits) {
  constexpr int kC = D / 4;
  constexpr int kR = kMergeThreads / kC;
  extern __shared__ float s_w[];  // [n_splits]
  __shared__ float4 s_part[kR][kC];
  __shared__ float s_red[kMergeThreads / 32];
  const size_t row = blockIdx.x;
  const float* ls = part_lse + row * n_splits;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  float mx = kNegInf;
  for (int s = tid; s < n_splits; s += kMergeThreads) mx = fmaxf(mx, ls[s]);
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) s_red[warp] = mx;
  __syncthreads();
  mx = kNegInf;
#pragma unroll
  for (int w = 0; w < kMergeThreads / 32; ++w) mx = fmaxf(mx, s_red[w]);
  __syncthreads();  // s_red is reused below

  if (mx == kNegInf) {  // an empty sequence
    for (int i = tid; i < D; i += kMergeThreads) out[row * D + i] = 0.0f;
    if (lse != nullptr && tid == 0) lse[row] = kNegInf;
    return;
  }
  float sum = 0.0f;
  for (int s = tid; s < n_splits; s += kMergeThreads) {
    const float w = ex2(ls[s] - mx);  // -inf (empty split) -> 0
    s_w[s] = w;
    sum += w;
  }
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) s_red[warp] = sum;
  __syncthreads();
  sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kMergeThreads / 32; ++w) sum += s_red[w];

  const int c = tid % kC, r = tid / kC;
  const float4* po = reinterpret_cast<const float4*>(part_o + row * n_splits * D);
  float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  auto add = [&a](float w, float4 x) {
    a.x = fmaf(w, x.x, a.x);
    a.y = fmaf(w, x.y, a.y);
    a.z = fmaf(w, x.z, a.z);
    a.w = fmaf(w, x.w, a.w);
  };
  // The partials are L2 hits and the rows few at batch 1: latency-bound, so
  // kMergeUnroll independent loads go out before any is used. An empty
  // split's output was never written: weight 0 skips its load.
  int s = r;
  for (; s + (kMergeUnroll - 1) * kR < n_splits; s += kMergeUnroll * kR) {
    float w[kMergeUnroll];
    float4 x[kMergeUnroll];
#pragma unroll
    for (int k = 0; k < kMergeUnroll; ++k) {
      w[k] = s_w[s + k * kR];
      x[k] = w[k] != 0.0f ? po[size_t(s + k * kR) * kC + c] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int k = 0; k < kMergeUnroll; ++k) add(w[k], x[k]);
  }
  for (; s < n_splits; s += kR) {
    const float w = s_w[s];
    if (w != 0.0f) add(w, po[size_t(s) * kC + c]);
  }
  s_part[r][c] = a;
  __syncthreads();
  if (r == 0) {
    float4 t = s_part[0][c];
#pragma unroll
    for (int k = 1; k < kR; ++k) {
      const float4 x = s_part[k][c];
      t.x += x.x, t.y += x.y, t.z += x.z, t.w += x.w;
    }
    const float inv = 1.0f / sum;
    reinterpret_cast<float4*>(out + row * D)[c] = make_float4(t.x * inv, t.y * inv, t.z * inv, t.w * inv);
    if (lse != nullptr && c == 0) lse[row] = (mx + log2f(sum)) * kLn2;
  }
}

using SplitKernel = void (*)(Params);

template <int D>
SplitKernel split_kernel_for(int hb) {
  switch (hb) {
    case 1: return dense_split_kernel<D, 1>;
    case 2: return dense_split_kernel<D, 2>;
    case 4: return dense_split_kernel<D, 4>;
    case 8: return dense_split_kernel<D, 8>;
  }
  TQ_ASSERT(false);
  return nullptr;
}

SplitKernel split_kernel(int d, int hb) {
  switch (d) {
    case 64: return split_kernel_for<64>(hb);
    case 128: return split_kernel_for<128>(hb);
    case 256: return split_kernel_for<256>(hb);
  }
  TQ_ASSERT(false);
  return nullptr;
}

template <int D>
int step_tokens_for(int hb) {
  switch (hb) {
    case 1: return Tile<D, 1>::kStep;
    case 2: return Tile<D, 2>::kStep;
    case 4: return Tile<D, 4>::kStep;
    case 8: return Tile<D, 8>::kStep;
  }
  TQ_ASSERT(false);
  return 0;
}

int step_tokens(int d, int hb) {
  switch (d) {
    case 64: return step_tokens_for<64>(hb);
    case 128: return step_tokens_for<128>(hb);
    case 256: return step_tokens_for<256>(hb);
  }
  TQ_ASSERT(false);
  return 0;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

DenseDecodePlan dense_decode_plan(const DenseDecodeArgs& a, int n_splits) {
  TQ_REQUIRE(a.batch >= 1, "dense decode: batch must be >= 1, got ", a.batch);
  TQ_REQUIRE(a.n_heads_kv >= 1 && a.n_heads_q >= a.n_heads_kv && a.n_heads_q % a.n_heads_kv == 0,
             "dense decode: n_heads_q ", a.n_heads_q, " must be a positive multiple of n_heads_kv ",
             a.n_heads_kv);
  TQ_REQUIRE(a.head_dim == 64 || a.head_dim == 128 || a.head_dim == 256, "dense decode: head_dim ",
             a.head_dim, " is not supported (expected 64, 128 or 256)");
  TQ_REQUIRE(a.max_ctx >= 1, "dense decode: max_ctx must be >= 1, got ", a.max_ctx);
  TQ_REQUIRE(a.max_len >= 0 && a.max_len <= a.max_ctx, "dense decode: max_len ", a.max_len,
             " is outside [0, max_ctx = ", a.max_ctx, "]");
  TQ_REQUIRE(n_splits >= 0 && n_splits <= kMaxSplits, "dense decode: n_splits ", n_splits,
             " is outside [0, ", kMaxSplits, "]");
  DenseDecodePlan p;
  p.batch = a.batch;
  p.n_heads_q = a.n_heads_q;
  p.n_heads_kv = a.n_heads_kv;
  p.head_dim = a.head_dim;
  p.max_ctx = a.max_ctx;
  const int g = a.n_heads_q / a.n_heads_kv;
  p.heads_per_block = 1;
  while (p.heads_per_block < g && p.heads_per_block < kMaxHeadsPerBlock) p.heads_per_block *= 2;
  p.n_head_blocks = (g + p.heads_per_block - 1) / p.heads_per_block;
  const int len = a.max_len > 0 ? a.max_len : a.max_ctx;
  const int step = step_tokens(a.head_dim, p.heads_per_block);
  if (n_splits == 0) {
    // One full wave of resident blocks: equal work per block, so more waves
    // only add tail; at large batch one split already fills the device.
    int dev = 0, sms = 0, per_sm = 0;
    TQ_CUDA_CHECK(cudaGetDevice(&dev));
    TQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    TQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, split_kernel(a.head_dim, p.heads_per_block), kThreads, 0));
    const long resident = long(std::max(1, sms)) * std::max(1, per_sm);
    const long per_split = long(a.batch) * a.n_heads_kv * p.n_head_blocks;
    const long by_len = std::max(1, (len + kMinSplitTokens - 1) / kMinSplitTokens);
    n_splits = int(std::clamp(resident / per_split, 1L, std::min<long>(by_len, kMaxSplits)));
  }
  // Whole block steps per split; the count follows from the rounding.
  const int per = (len + n_splits - 1) / n_splits;
  p.split_tokens = std::max(step, (per + step - 1) / step * step);
  p.n_splits = std::max(1, (len + p.split_tokens - 1) / p.split_tokens);
  p.workspace_bytes = p.n_splits > 1 ? size_t(a.batch) * a.n_heads_q * p.n_splits *
                                           (size_t(a.head_dim) + 1) * sizeof(float)
                                     : 0;
  return p;
}

void dense_decode_bf16(const DenseDecodeArgs& a, const DenseDecodePlan& plan, void* workspace,
                       size_t workspace_bytes, Stream stream) {
  TQ_REQUIRE(plan.n_splits >= 1 && a.batch == plan.batch && a.n_heads_q == plan.n_heads_q &&
                 a.n_heads_kv == plan.n_heads_kv && a.head_dim == plan.head_dim &&
                 a.max_ctx == plan.max_ctx,
             "dense decode: the arguments (batch ", a.batch, ", heads ", a.n_heads_q, "/",
             a.n_heads_kv, ", head_dim ", a.head_dim, ", max_ctx ", a.max_ctx,
             ") do not match the plan (batch ", plan.batch, ", heads ", plan.n_heads_q, "/",
             plan.n_heads_kv, ", head_dim ", plan.head_dim, ", max_ctx ", plan.max_ctx, ")");
  TQ_REQUIRE(a.k && a.v && a.lengths && a.q && a.out,
             "dense decode: k, v, lengths, q and out must be device pointers, got a null one");
  TQ_REQUIRE(aligned16(a.k) && aligned16(a.v) && aligned16(a.q),
             "dense decode: k, v and q must be 16-byte aligned");
  TQ_REQUIRE(workspace_bytes >= plan.workspace_bytes, "dense decode: workspace of ",
             workspace_bytes, " bytes, the plan needs ", plan.workspace_bytes);
  TQ_REQUIRE(plan.workspace_bytes == 0 || aligned16(workspace),
             "dense decode: the workspace must be 16-byte aligned");
  const int D = a.head_dim, hq = a.n_heads_q;
  Params p;
  p.k = a.k;
  p.v = a.v;
  p.lengths = a.lengths;
  p.q = a.q;
  p.q_bf16 = a.q_type == DenseQType::bf16;
  p.out = a.out;
  p.lse = a.lse;
  p.part_o = plan.n_splits > 1 ? static_cast<float*>(workspace) : nullptr;
  p.part_lse = plan.n_splits > 1 ? p.part_o + size_t(a.batch) * hq * plan.n_splits * D : nullptr;
  p.n_heads_q = hq;
  p.n_heads_kv = a.n_heads_kv;
  p.group = hq / a.n_heads_kv;
  p.n_head_blocks = plan.n_head_blocks;
  p.max_ctx = a.max_ctx;
  p.n_splits = plan.n_splits;
  p.split_tokens = plan.split_tokens;
  const float scale = a.scale > 0.0f ? a.scale : 1.0f / std::sqrt(static_cast<float>(D));
  p.q_mul = scale * kLog2e;
  auto* s = static_cast<cudaStream_t>(stream);
  const dim3 grid(plan.n_splits, a.n_heads_kv * plan.n_head_blocks, a.batch);
  TQ_REQUIRE(a.batch <= 65535 && grid.y <= 65535u, "dense decode: batch ", a.batch, " or ",
             grid.y, " head blocks exceed the grid limit 65535");
  split_kernel(D, plan.heads_per_block)<<<grid, kThreads, 0, s>>>(p);
  TQ_CUDA_CHECK_LAUNCH();
  if (plan.n_splits == 1) return;
  const size_t smem = size_t(plan.n_splits) * sizeof(float);
  const unsigned rows = unsigned(a.batch) * unsigned(hq);
  switch (D) {
    case 64:
      dense_merge_kernel<64><<<rows, kMergeThreads, smem, s>>>(p.part_o, p.part_lse, a.out, a.lse, plan.n_splits);
      break;
    case 128:
      dense_merge_kernel<128><<<rows, kMergeThreads, smem, s>>>(p.part_o, p.part_lse, a.out, a.lse, plan.n_splits);
      break;
    case 256:
      dense_merge_kernel<256><<<rows, kMergeThreads, smem, s>>>(p.part_o, p.part_lse, a.out, a.lse, plan.n_splits);
      break;
  }
  TQ_CUDA_CHECK_LAUNCH();
}

}  // namespace tq::cuda
