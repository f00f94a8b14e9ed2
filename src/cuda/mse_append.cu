// Quantize-append for tq-mse records, bit-identical to the CPU encoder
// (MseQuantizer::encode_one over kernels_ref.cpp):
//   norm   = sqrtf(sum x_i^2), 16 lane partial sums (element i -> lane i % 16,
//            index order) then the tree w = 8, 4, 2, 1: lane[i] += lane[i + w];
//   y      = x * signs; FWHT stages h = 1, 2, 4, ..., each output one a+b or
//            a-b; then y_i *= 1/sqrt(dim) (a separate rounding);
//   code_i = #{k : boundaries[k] < y_i * (1 / norm)} (the CPU's branch-free
//            binary search computes exactly this count);
//            packed little-endian; scale = fp16(norm), RNE (by integer
//            arithmetic, as src/util/half.cpp).
// Every float operation is an explicit round-to-nearest intrinsic and this
// file is compiled with -fmad=false: nvcc must not fuse or reorder anything
// here, or a code near a boundary flips. (The one __fmaf_rn below computes a
// table cell, where an fma is what the host computes too.)
//
// Before that, each input element is rounded to the layer's round_to format
// (f16 by default), as KvCache::append rounds each token to its dense format.
//
// Layout of the work (issue 5: the append must run near the speed of one read
// of its input):
//  - a block of 256 threads (128 for head_dim 64) takes tiles of up to 128
//    vectors (64 for head_dim 256; n tokens x nh heads of one page,
//    AppendTile) in a persistent loop; a tile's input is one contiguous run
//    of rows when nh == n_heads, brought into shared memory by cp.async
//    (16-byte, coalesced), each thread's slice padded by 16 bytes so that the
//    16-byte shared reads of 8 lanes hit 32 banks;
//  - 64 elements a thread: one thread per vector for head_dim 64, two
//    adjacent lanes for 128, four for 256 (more elements a thread unroll to
//    so much code that the warps stall on instruction fetch). The vector
//    lives in registers: signs are an xor of the sign bit (constant bank;
//    shared memory with several lanes a vector), the norm's 16 partial sums
//    are 16 registers in the canonical order (each lane continues the
//    previous lane's), the FWHT's stages are in-register butterflies and the
//    last one or two pair the lanes (a shuffle and one fma(+-1, own,
//    partner's) per element);
//  - codes come from a 32-cell table held one cell per lane and read by warp
//    shuffles (AppendSearch in mse_append.hpp; the binary search in shared
//    memory for 6 bits and more), packed into 32-bit words at compile-time
//    bit positions;
//  - records go to a shared staging area laid out like their destination
//    (per head, n consecutive records, at the destination's address mod 16),
//    then out with 16-byte stores: consecutive tokens of a head are adjacent
//    records of the page.
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/cuda_check.hpp"
#include "cuda/mse_append.hpp"
#include "turboquant/error.hpp"

namespace tq::cuda {

// One per input type (mse_append_{f32,f16,bf16}.cu).
void launch_append_f32(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t stream);
void launch_append_f16(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t stream);
void launch_append_bf16(const AppendLaunch& a, const AppendFormat& fmt, cudaStream_t stream);

namespace {

__global__ void append_commit_kernel(const int* pt, int n_pt, const int* len, int n_len, int* page_table,
                                     int* lengths, int* status, const int* extra_status, int* sticky) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  // Every thread decides from the words itself; thread 0's writes of the
  // union cannot change a decision (they only add flags to a word that
  // already makes the decision "refused").
  const int st = *status | (extra_status != nullptr ? *extra_status : 0) | (sticky != nullptr ? *sticky : 0);
  if (i == 0 && st != 0) {
    *status = st;
    if (sticky != nullptr) atomicOr(sticky, st);
  }
  if (i < n_pt) page_table[pt[2 * i]] = pt[2 * i + 1];
  if (i < n_len && st == 0) lengths[len[2 * i]] = len[2 * i + 1];
}

}  // namespace

// ---- launch ---------------------------------------------------------------------

int append_sm_count() {
  static const int n = [] {
    int dev = 0, sms = 0;
    TQ_CUDA_CHECK(cudaGetDevice(&dev));
    TQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return sms;
  }();
  return n;
}

// Resident blocks per SM of a kernel at a dynamic shared-memory size. The
// kernel's dynamic shared-memory limit is raised once, to the device's
// opt-in maximum (a cap, not a reservation: occupancy follows each launch's
// own size), so that layers of different record sizes can share a kernel.
int append_blocks_per_sm(const void* kernel, int smem, int threads) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> cache;
  static std::map<const void*, bool> raised;
  std::lock_guard<std::mutex> lk(mu);
  auto it = cache.find({kernel, smem});
  if (it != cache.end()) return it->second;
  if (!raised[kernel]) {
    int dev = 0, optin = 0;
    TQ_CUDA_CHECK(cudaGetDevice(&dev));
    TQ_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cudaFuncAttributes fa{};  // its static shared memory (a captured step's commit) counts against the cap
    TQ_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
    const int cap = optin - int(fa.sharedSizeBytes);
    TQ_REQUIRE(smem <= cap, "GPU KV layer: the append kernel needs ", smem,
               " bytes of dynamic shared memory, the device allows ", cap);
    TQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, cap));
    raised[kernel] = true;
  }
  int nb = 0;
  TQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, threads, smem));
  TQ_REQUIRE(nb >= 1, "GPU KV layer: the append kernel does not fit an SM with ", smem,
             " bytes of shared memory");
  cache[{kernel, smem}] = nb;
  return nb;
}

AppendFormat append_format(const MseDeviceFormat& f, const std::vector<float>& signs,
                           const std::vector<float>& boundaries) {
  TQ_ASSERT(f.dim == 64 || f.dim == 128 || f.dim == 256);
  TQ_ASSERT(int(signs.size()) == f.dim && int(boundaries.size()) == (1 << f.bits) - 1);
  AppendFormat a{};
  a.f = f;
  for (int i = 0; i < f.dim; ++i) {
    TQ_ASSERT(signs[i] == 1.0f || signs[i] == -1.0f);
    a.sign_f32[i] = signs[i] < 0 ? 0x80000000u : 0u;
  }
  for (int j = 0; j < f.dim / 2; ++j) a.sign_pair[j] = (a.sign_f32[2 * j] >> 16) | a.sign_f32[2 * j + 1];
  a.tab = search_table(boundaries, f.bits);
  return a;
}

void launch_mse_append_tiles(const AppendLaunch& a, const AppendFormat& fmt, CUstream_st* stream) {
  if (a.n_tiles == 0) return;
  TQ_ASSERT((reinterpret_cast<uintptr_t>(a.x) & 15) == 0);
  TQ_ASSERT(a.n_heads >= 1 && a.n_heads <= 65535);
  switch (a.dtype) {
    case DType::f32: return launch_append_f32(a, fmt, stream);
    case DType::f16: return launch_append_f16(a, fmt, stream);
    case DType::bf16: return launch_append_bf16(a, fmt, stream);
  }
  TQ_ASSERT(false);
}

void launch_append_commit(const int* pt_updates, int n_pt, const int* len_updates, int n_len,
                          int* page_table, int* lengths, int* status, const int* extra_status,
                          int* sticky, CUstream_st* stream) {
  const int n = std::max(n_pt, n_len);
  if (n == 0) return;
  append_commit_kernel<<<(n + 255) / 256, 256, 0, stream>>>(pt_updates, n_pt, len_updates, n_len,
                                                            page_table, lengths, status, extra_status, sticky);
  TQ_CUDA_CHECK_LAUNCH();
}

}  // namespace tq::cuda
