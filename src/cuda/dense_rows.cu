// Dense tokens of the GPU KV layer (GpuKvLayerConfig::dense_window /
// dense_prefix): appended K/V rounded to the f16 rows the layer keeps, with
// what KvCache's f16 dense format refuses flagged in a status word; the row
// moves of a batched decode append, all in one launch; and the plan of a
// captured decode step, made on the device.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/cuda_check.hpp"
#include "cuda/mse_append_kernel.cuh"  // float_to_half_bits: the CPU's rounding in integer arithmetic

namespace tq::cuda {
namespace {

// Element i of src as f16 bits, rounded as src/util/half.cpp rounds; what
// KvCache's f16 dense format refuses OR'd into st.
__device__ __forceinline__ uint16_t element_to_f16(const void* __restrict__ src, int dtype, size_t i, int& st) {
  float x;
  if (dtype == int(DType::f32)) x = static_cast<const float*>(src)[i];
  else if (dtype == int(DType::f16)) x = __half2float(__ushort_as_half(static_cast<const uint16_t*>(src)[i]));
  else x = __uint_as_float(unsigned(static_cast<const uint16_t*>(src)[i]) << 16);  // bf16: exact
  if (!isfinite(x)) st |= kStatusNonFinite;
  else if (fabsf(x) > kHalfMax) st |= kStatusDenseOverflow;
  return static_cast<uint16_t>(float_to_half_bits(x));
}

__global__ void to_f16_rows_kernel(const void* __restrict__ src, int dtype, size_t n,
                                   uint16_t* __restrict__ dst, int* __restrict__ status) {
  int st = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = element_to_f16(src, dtype, i, st);
  if (st) atomicOr(status, st);
}

// The slot of a sequence's new dense token (-1: none, the prefix is full and
// there is no window) and the state after it, as append_batch_dense decides
// on the host; a full ring's oldest token has left for the pages.
__device__ __forceinline__ int dense_slot_of_new(int S, int W, int& n_pre, int& win_start, int& win_count) {
  if (n_pre < S) return n_pre++;
  if (W == 0) return -1;
  if (win_count < W) return S + (win_start + win_count++) % W;
  const int slot = S + win_start;  // the oldest's slot
  win_start = (win_start + 1) % W;
  return slot;
}

// Block i plans row i of a captured step (DenseStepPlan): the same decisions
// as GpuKvLayer's append_batch_dense, from the device's state of the sequence.
__global__ void dense_step_plan_kernel(const __grid_constant__ DenseStepPlan p) {
  const int i = blockIdx.x, seq = p.seqs[i];
  const DenseStepRows& d = p.rows;
  const int S = d.prefix_slots, W = d.window_slots;
  const int n_pre = d.state[3 * seq], win_start = d.state[3 * seq + 1], win_count = d.state[3 * seq + 2];
  const bool to_pages = n_pre >= S && win_count >= W;
  const size_t row = p.row_elems, rb = row * 2;
  uint16_t* const nk = reinterpret_cast<uint16_t*>(p.new_k + i * rb);
  uint16_t* const nv = reinterpret_cast<uint16_t*>(p.new_v + i * rb);
  uint16_t* const pk = reinterpret_cast<uint16_t*>(p.page_k + i * rb);
  uint16_t* const pv = reinterpret_cast<uint16_t*>(p.page_v + i * rb);
  int st = 0;
  for (size_t e = threadIdx.x; e < row; e += blockDim.x) {
    const uint16_t hk = element_to_f16(p.k, int(p.dtype), i * row + e, st);
    const uint16_t hv = element_to_f16(p.v, int(p.dtype), i * row + e, st);
    nk[e] = hk;
    nv[e] = hv;
    if (to_pages && W == 0) {  // nothing stays dense past the prefix: the new row itself
      pk[e] = hk;
      pv[e] = hv;
    }
  }
  if (st) atomicOr(p.status, st);
  const size_t slots = size_t(S + W);
  auto dense_row = [&](uint8_t* base, int slot) { return base + (size_t(seq) * slots + slot) * rb; };
  if (to_pages && W > 0) {  // the ring's oldest row leaves for the pages
    const uint4* ok = reinterpret_cast<const uint4*>(dense_row(d.dense_k, S + win_start));
    const uint4* ov = reinterpret_cast<const uint4*>(dense_row(d.dense_v, S + win_start));
    for (size_t j = threadIdx.x; j < rb / 16; j += blockDim.x) {
      reinterpret_cast<uint4*>(pk)[j] = ok[j];
      reinterpret_cast<uint4*>(pv)[j] = ov[j];
    }
  }
  if (threadIdx.x == 0) {
    int np = n_pre, ws = win_start, wc = win_count;
    const int slot = dense_slot_of_new(S, W, np, ws, wc);
    DenseRowCopy c;
    c.src_k = reinterpret_cast<const uint8_t*>(nk);
    c.src_v = reinterpret_cast<const uint8_t*>(nv);
    c.dst_k = slot >= 0 ? dense_row(d.dense_k, slot) : nullptr;
    c.dst_v = slot >= 0 ? dense_row(d.dense_v, slot) : nullptr;
    p.copies[i] = c;
    p.states[4 * i] = seq;
    p.states[4 * i + 1] = np;
    p.states[4 * i + 2] = ws;
    p.states[4 * i + 3] = wc;
    d.active[i] = to_pages ? 1 : 0;
  }
}

// Block i moves copy i (16-byte pieces; none when dst_k is null); the
// states ride along.
__global__ void dense_row_copies_kernel(const DenseRowCopy* __restrict__ copies, size_t row_bytes,
                                        const int* __restrict__ states, int* __restrict__ state,
                                        const int* __restrict__ only_if_clean, int* sticky) {
  const int st = only_if_clean != nullptr ? *only_if_clean : 0;
  if (sticky != nullptr && st != 0 && blockIdx.x == 0 && threadIdx.x == 0) atomicOr(sticky, st);
  if (st != 0 || (sticky != nullptr && *sticky != 0)) return;
  const DenseRowCopy c = copies[blockIdx.x];
  const size_t n16 = c.dst_k != nullptr ? row_bytes / 16 : 0;
  for (size_t j = threadIdx.x; j < n16; j += blockDim.x) {
    reinterpret_cast<uint4*>(c.dst_k)[j] = reinterpret_cast<const uint4*>(c.src_k)[j];
    reinterpret_cast<uint4*>(c.dst_v)[j] = reinterpret_cast<const uint4*>(c.src_v)[j];
  }
  if (states != nullptr && threadIdx.x < 3)
    state[3 * states[4 * blockIdx.x] + threadIdx.x] = states[4 * blockIdx.x + 1 + threadIdx.x];
}

// Block i: the new row of the step's row i into its slot and the sequence's
// next state (the decisions of dense_step_plan_kernel), unless the layer's
// error word holds a refusal: the step's commit has run before.
__global__ void dense_step_finish_kernel(const AppendStepTiles step, const void* __restrict__ k,
                                         const void* __restrict__ v, int dtype, size_t row_elems,
                                         const DenseStepRows d) {
  if (__ldcg(step.sticky) != 0) return;
  const int i = blockIdx.x, seq = step.seqs[i];
  const int S = d.prefix_slots, W = d.window_slots;
  int np = d.state[3 * seq], ws = d.state[3 * seq + 1], wc = d.state[3 * seq + 2];
  const int slot = dense_slot_of_new(S, W, np, ws, wc);
  if (slot >= 0) {
    const size_t at = (size_t(seq) * (S + W) + slot) * row_elems;
    uint16_t* const dk = reinterpret_cast<uint16_t*>(d.dense_k) + at;
    uint16_t* const dv = reinterpret_cast<uint16_t*>(d.dense_v) + at;
    int st = 0;  // (the step checked the values)
    for (size_t e = threadIdx.x; e < row_elems; e += blockDim.x) {
      dk[e] = element_to_f16(k, dtype, i * row_elems + e, st);
      dv[e] = element_to_f16(v, dtype, i * row_elems + e, st);
    }
  }
  __syncthreads();  // every thread has read the state
  if (threadIdx.x == 0) {
    d.state[3 * seq] = np;
    d.state[3 * seq + 1] = ws;
    d.state[3 * seq + 2] = wc;
  }
}

}  // namespace

void launch_dense_step_finish(const AppendStepTiles& step, const void* k, const void* v, DType dtype,
                              int n_heads, int dim, const DenseStepRows& dense, cudaStream_t stream) {
  if (step.n == 0) return;
  dense_step_finish_kernel<<<step.n, 256, 0, stream>>>(step, k, v, int(dtype), size_t(n_heads) * dim, dense);
  TQ_CUDA_CHECK(cudaGetLastError());
}

void launch_dense_row_copies(const DenseRowCopy* copies, int n, size_t row_bytes, const int* states,
                             int* state, const int* only_if_clean, int* sticky, cudaStream_t stream) {
  if (n == 0) return;
  TQ_ASSERT(row_bytes % 16 == 0);
  dense_row_copies_kernel<<<n, 128, 0, stream>>>(copies, row_bytes, states, state, only_if_clean, sticky);
  TQ_CUDA_CHECK(cudaGetLastError());
}

void launch_dense_step_plan(const DenseStepPlan& p, cudaStream_t stream) {
  if (p.n == 0) return;
  TQ_ASSERT(p.row_elems % 8 == 0);
  dense_step_plan_kernel<<<p.n, 256, 0, stream>>>(p);
  TQ_CUDA_CHECK(cudaGetLastError());
}

void launch_to_f16_rows(const void* src, DType dtype, size_t n, uint16_t* dst, int* status,
                        cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const int blocks = int(std::min<size_t>((n + threads - 1) / threads, 4096));
  to_f16_rows_kernel<<<blocks, threads, 0, stream>>>(src, int(dtype), n, dst, status);
  TQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tq::cuda
