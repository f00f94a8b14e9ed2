// Code-fetch probe: what does straight-line code cost when the L2 holds none
// of it (the harness's flush evicts the kernel's instructions as well as its
// data)? docs/kernel-notes.md, twenty-first session.
//
// Build: nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -o /tmp/code_fetch lab/cuda/code_fetch.cu
// Run:   /tmp/code_fetch            (seconds on an H200)
//
// Kernels of N straight-line FFMAs (16 bytes each, 8 independent chains, so
// issue-bound when the code is cached) and, as a control, a loop executing the
// same N FFMAs from 1 KB of code. 132 blocks of 128 threads (one warp per
// scheduler, one block per SM). Event span medians of 30 runs, each run:
//   cold: L2 flush (read 256 MiB), event, kernel, event (as tq gpu-bench);
//   warm: event, kernel, event back to back (code in L2, maybe in the SMs).
// cold - warm of the straight-line kernel against the loop's is the price of
// fetching its code from DRAM.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(call)                                                                                 \
  do {                                                                                           \
    const cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace {

constexpr int kRuns = 30;
constexpr size_t kFlushBytes = size_t(256) << 20;

__global__ void flush_kernel(const uint4* __restrict__ src, size_t n, unsigned* sink) {
  unsigned s = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(src + i));
    s += v.x ^ v.w;
  }
  if (s == 0x12345678u) sink[0] = s;
}

#define FMA8                                                                             \
  asm volatile(                                                                          \
      "fma.rn.f32 %0, %0, %8, %9;\n fma.rn.f32 %1, %1, %8, %9;\n"                       \
      "fma.rn.f32 %2, %2, %8, %9;\n fma.rn.f32 %3, %3, %8, %9;\n"                       \
      "fma.rn.f32 %4, %4, %8, %9;\n fma.rn.f32 %5, %5, %8, %9;\n"                       \
      "fma.rn.f32 %6, %6, %8, %9;\n fma.rn.f32 %7, %7, %8, %9;\n"                       \
      : "+f"(a[0]), "+f"(a[1]), "+f"(a[2]), "+f"(a[3]), "+f"(a[4]), "+f"(a[5]), "+f"(a[6]), \
        "+f"(a[7])                                                                       \
      : "f"(m), "f"(c));

// N8 groups of 8 FFMAs as straight-line code (~N8 * 128 bytes of SASS).
template <int N8>
__global__ void __launch_bounds__(128) straight_kernel(float m, float c, float* out) {
  float a[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) a[k] = float(threadIdx.x + k);
#pragma unroll
  for (int i = 0; i < N8; ++i) { FMA8 }
  float s = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) s += a[k];
  if (s == 1234.5f) out[blockIdx.x] = s;
}

// The same work from a loop of 8 groups (1 KB of code).
__global__ void __launch_bounds__(128) loop_kernel(int n8, float m, float c, float* out) {
  float a[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) a[k] = float(threadIdx.x + k);
#pragma unroll 1
  for (int i = 0; i < n8; i += 8) {
#pragma unroll
    for (int j = 0; j < 8; ++j) { FMA8 }
  }
  float s = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) s += a[k];
  if (s == 1234.5f) out[blockIdx.x] = s;
}

struct Ctx {
  uint4* flush = nullptr;
  unsigned* sink = nullptr;
  float* out = nullptr;
  int sms = 0;
  cudaEvent_t e0[kRuns], e1[kRuns];
};

void do_flush(Ctx& x) {
  flush_kernel<<<x.sms * 8, 256>>>(x.flush, kFlushBytes / 16, x.sink);
  CK(cudaGetLastError());
}

template <class F>
double median_us(Ctx& x, bool cold, F&& launch) {
  for (int w = 0; w < 3; ++w) {
    if (cold) do_flush(x);
    launch();
  }
  CK(cudaDeviceSynchronize());
  for (int r = 0; r < kRuns; ++r) {
    if (cold) do_flush(x);
    CK(cudaEventRecord(x.e0[r]));
    launch();
    CK(cudaEventRecord(x.e1[r]));
  }
  CK(cudaDeviceSynchronize());
  std::vector<float> t(kRuns);
  for (int r = 0; r < kRuns; ++r) CK(cudaEventElapsedTime(&t[r], x.e0[r], x.e1[r]));
  std::sort(t.begin(), t.end());
  return 500.0 * (t[kRuns / 2 - 1] + t[kRuns / 2]);
}

template <int N8>
void row(Ctx& x) {
  auto straight = [&] {
    straight_kernel<N8><<<x.sms, 128>>>(1.0001f, 0.5f, x.out);
    CK(cudaGetLastError());
  };
  auto loop = [&] {
    loop_kernel<<<x.sms, 128>>>(N8, 1.0001f, 0.5f, x.out);
    CK(cudaGetLastError());
  };
  cudaFuncAttributes fa{};
  CK(cudaFuncGetAttributes(&fa, straight_kernel<N8>));
  const double sc = median_us(x, true, straight), sw = median_us(x, false, straight);
  const double lc = median_us(x, true, loop), lw = median_us(x, false, loop);
  std::printf("%6d %8.1f %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f\n", N8 * 8, N8 * 8 * 16 / 1024.0, sc, sw, lc, lw,
              sc - sw, (sc - sw) - (lc - lw));
}

}  // namespace

int main() {
  Ctx x;
  CK(cudaDeviceGetAttribute(&x.sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaMalloc(&x.flush, kFlushBytes));
  CK(cudaMemset(x.flush, 1, kFlushBytes));
  CK(cudaMalloc(&x.sink, 64));
  CK(cudaMalloc(&x.out, 4096));
  for (int r = 0; r < kRuns; ++r) {
    CK(cudaEventCreate(&x.e0[r]));
    CK(cudaEventCreate(&x.e1[r]));
  }
  std::printf("code fetch probe: %d blocks x 128 threads; event spans, median of %d (us)\n", x.sms, kRuns);
  std::printf("%6s %8s %9s %9s %9s %9s %9s %9s\n", "ffma", "code_KB", "str_cold", "str_warm", "loop_cold",
              "loop_warm", "str_c-w", "excess");
  row<8>(x);
  row<32>(x);
  row<128>(x);
  row<256>(x);
  row<512>(x);
  row<1024>(x);
  row<2048>(x);
  return 0;
}
