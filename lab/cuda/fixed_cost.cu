// Fixed-cost probe: where do the ~20-25 us per call at batch 1 come from?
// (docs/kernel-notes.md: 8.5 MB and 34.6 MB of codes both take 28.6 us.)
//
// Build: nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -o /tmp/fixed_cost lab/cuda/fixed_cost.cu
// Run:   /tmp/fixed_cost            (a few seconds on an H200)
//
// Self-contained on purpose (no project headers): it measures the timing
// method of tools/tq/cmd_gpu_bench.cpp (time_median: an L2 flush by reading
// a 256 MiB buffer, then event, launch, event; median of 30 runs) on kernels
// with no fixed cost of their own.
//  (a) A streaming read (the harness's read kernel: uint4 loads, grid-stride,
//      unroll 4) over sizes from 4 to 537 MiB, three ways:
//        flush:   flush, event, read, event (the harness);
//        touch:   flush, a tiny kernel reading 16 bytes every 64 KiB of the
//                 buffer (TLB warm, L2 almost empty of it), event, read, event;
//        noflush: event, read, event back to back (only meaningful above L2).
//      A least-squares line t = a + bytes / bw per way: a is the fixed cost.
//      If flush has a large intercept and touch a small one, the fixed cost
//      is TLB misses after the flush; if both are large, it is elsewhere
//      (launch, ramp-up, the event span itself).
//  (b) Event spans of empty kernels after the flush: one kernel, two back to
//      back, and a normal kernel followed by a programmatic dependent one
//      (cudaLaunchKernelEx + ProgrammaticStreamSerialization, as the decode
//      kernel and its merge are launched).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(call)                                                                          \
  do {                                                                                    \
    const cudaError_t e_ = (call);                                                        \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                  \
                   cudaGetErrorString(e_));                                               \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)
#define CK_LAUNCH() CK(cudaGetLastError())

namespace {

constexpr int kRuns = 30;
constexpr int kWarmup = 3;
constexpr int kReadThreads = 256;
constexpr int kReadUnroll = 4;  // 16-byte loads in flight per thread (as the harness)
constexpr size_t kFlushBytes = size_t(256) << 20;
constexpr size_t kTouchStride = size_t(64) << 10;
constexpr int kSizesMiB[] = {4, 8, 16, 34, 64, 134, 268, 537};

// The harness's load: streaming, no L1 allocation, 256-byte L2 prefetch.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// sink: [gridDim.x]; one word per block keeps the loads alive without atomics.
__global__ void __launch_bounds__(kReadThreads)
    read_kernel(const uint4* __restrict__ src, size_t n_vec, unsigned* __restrict__ sink) {
  const size_t stride = size_t(gridDim.x) * kReadThreads;
  size_t i = blockIdx.x * size_t(kReadThreads) + threadIdx.x;
  unsigned s = 0;
  for (; i + (kReadUnroll - 1) * stride < n_vec; i += kReadUnroll * stride) {
    uint4 v[kReadUnroll];
#pragma unroll
    for (int u = 0; u < kReadUnroll; ++u) v[u] = load_stream(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < kReadUnroll; ++u) s += v[u].x + v[u].y + v[u].z + v[u].w;
  }
  for (; i < n_vec; i += stride) {
    const uint4 v = load_stream(src + i);
    s += v.x + v.y + v.z + v.w;
  }
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  __shared__ unsigned part[kReadThreads / 32];
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned t = 0;
    for (int w = 0; w < kReadThreads / 32; ++w) t += part[w];
    sink[blockIdx.x] = t;
  }
}

// One 16-byte load every `stride_vec` vectors: fills the TLBs for the
// buffer while putting only n_touch lines of it into L2. sink: [n_touch]
__global__ void touch_kernel(const uint4* __restrict__ src, size_t n_touch, size_t stride_vec,
                             unsigned* __restrict__ sink) {
  const size_t t = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (t >= n_touch) return;
  const uint4 v = src[t * stride_vec];
  sink[t] = v.x + v.y + v.z + v.w;
}

__global__ void empty_kernel() {}

// The pair launched as the decode kernel and its merge are: the primary lets
// its dependent launch early, the dependent waits for the primary's writes.
__global__ void empty_primary_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__global__ void empty_dependent_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

int g_sms = 0;

int read_grid(size_t n_vec) {  // as the harness: at most 8 blocks per SM
  const size_t want = (n_vec + kReadThreads - 1) / kReadThreads;
  return int(std::max<size_t>(1, std::min<size_t>(want, size_t(g_sms) * 8)));
}

void read(const void* src, size_t bytes, unsigned* sink) {
  const size_t n_vec = bytes / 16;
  read_kernel<<<read_grid(n_vec), kReadThreads>>>(static_cast<const uint4*>(src), n_vec, sink);
  CK_LAUNCH();
}

void touch(const void* src, size_t bytes, unsigned* sink) {
  const size_t n_touch = (bytes + kTouchStride - 1) / kTouchStride;
  touch_kernel<<<unsigned((n_touch + 255) / 256), 256>>>(static_cast<const uint4*>(src), n_touch,
                                                         kTouchStride / 16, sink);
  CK_LAUNCH();
}

struct Events {
  cudaEvent_t start[kRuns], stop[kRuns];
  Events() {
    for (int r = 0; r < kRuns; ++r) {
      CK(cudaEventCreate(&start[r]));
      CK(cudaEventCreate(&stop[r]));
    }
  }
  ~Events() {
    for (int r = 0; r < kRuns; ++r) {
      (void)cudaEventDestroy(start[r]);
      (void)cudaEventDestroy(stop[r]);
    }
  }
};

// Median event span of body() over kRuns, each run preceded (outside the
// span) by pre(). Nothing synchronises between runs, as in the harness: the
// host runs ahead and the GPU sees a full queue.
template <class Pre, class Body>
double median_ms(Events& ev, Pre&& pre, Body&& body) {
  for (int w = 0; w < kWarmup; ++w) {
    pre();
    body();
  }
  CK(cudaDeviceSynchronize());
  for (int r = 0; r < kRuns; ++r) {
    pre();
    CK(cudaEventRecord(ev.start[r]));
    body();
    CK(cudaEventRecord(ev.stop[r]));
  }
  CK(cudaDeviceSynchronize());
  std::vector<float> t(kRuns);
  for (int r = 0; r < kRuns; ++r) CK(cudaEventElapsedTime(&t[r], ev.start[r], ev.stop[r]));
  std::sort(t.begin(), t.end());
  return kRuns % 2 ? t[kRuns / 2] : 0.5 * (double(t[kRuns / 2 - 1]) + t[kRuns / 2]);
}

struct Fit {
  double intercept_us = 0, tb_s = 0;
  int n = 0;
};

// Least squares t = a + b * bytes over the points (bytes, ms) flagged in use.
Fit fit_line(const std::vector<double>& bytes, const std::vector<double>& ms,
             const std::vector<bool>& use) {
  double n = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (size_t k = 0; k < bytes.size(); ++k) {
    if (!use[k]) continue;
    const double x = bytes[k], y = ms[k] * 1e-3;
    n += 1, sx += x, sy += y, sxx += x * x, sxy += x * y;
  }
  Fit f;
  f.n = int(n);
  const double den = n * sxx - sx * sx;
  if (n < 2 || den <= 0) return f;
  const double b = (n * sxy - sx * sy) / den, a = (sy - b * sx) / n;
  f.intercept_us = a * 1e6;
  f.tb_s = b > 0 ? 1.0 / b / 1e12 : 0.0;
  return f;
}

double gb_s(double bytes, double ms) { return bytes / (ms * 1e-3) / 1e9; }

}  // namespace

int main() {
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, dev));
  g_sms = prop.multiProcessorCount;
  const size_t l2 = size_t(prop.l2CacheSize);
  std::printf("device: %s (sm_%d%d), %d SMs, L2 %.1f MiB\n", prop.name, prop.major, prop.minor,
              g_sms, double(l2) / (1 << 20));
  std::printf("median of %d runs each; flush = read of a %zu MiB buffer (as the harness)\n\n", kRuns,
              kFlushBytes >> 20);

  const size_t max_bytes = size_t(*std::max_element(std::begin(kSizesMiB), std::end(kSizesMiB))) << 20;
  void *buf = nullptr, *flush_buf = nullptr;
  unsigned *sink = nullptr, *flush_sink = nullptr, *touch_sink = nullptr;
  CK(cudaMalloc(&buf, max_bytes));
  CK(cudaMalloc(&flush_buf, kFlushBytes));
  CK(cudaMalloc(&sink, sizeof(unsigned) * size_t(g_sms) * 8));
  CK(cudaMalloc(&flush_sink, sizeof(unsigned) * size_t(g_sms) * 8));
  CK(cudaMalloc(&touch_sink, sizeof(unsigned) * (max_bytes / kTouchStride + 1)));
  CK(cudaMemset(buf, 1, max_bytes));  // once, outside any timing
  CK(cudaMemset(flush_buf, 0, kFlushBytes));
  CK(cudaDeviceSynchronize());
  Events ev;

  auto flush = [&] { read(flush_buf, kFlushBytes, flush_sink); };
  auto nothing = [] {};

  // (a) streaming read.
  std::vector<double> xs, t_flush, t_touch, t_noflush;
  std::vector<bool> all, above_l2;
  std::printf("(a) streaming read (ms, GB/s)\n");
  std::printf("%8s %10s | %9s %7s | %9s %7s | %9s %7s\n", "MiB", "MB", "flush", "GB/s", "touch",
              "GB/s", "noflush", "GB/s");
  for (int mib : kSizesMiB) {
    const size_t bytes = size_t(mib) << 20;
    const double a = median_ms(ev, flush, [&] { read(buf, bytes, sink); });
    const double b = median_ms(ev, [&] { flush(); touch(buf, bytes, touch_sink); },
                               [&] { read(buf, bytes, sink); });
    const double c = median_ms(ev, nothing, [&] { read(buf, bytes, sink); });
    xs.push_back(double(bytes));
    t_flush.push_back(a);
    t_touch.push_back(b);
    t_noflush.push_back(c);
    all.push_back(true);
    above_l2.push_back(bytes > l2);
    std::printf("%8d %10.1f | %9.4f %7.0f | %9.4f %7.0f | %9.4f %7.0f%s\n", mib, double(bytes) / 1e6,
                a, gb_s(double(bytes), a), b, gb_s(double(bytes), b), c, gb_s(double(bytes), c),
                bytes > l2 ? "" : "  (noflush: fits in L2)");
  }
  const Fit ff = fit_line(xs, t_flush, all), ft = fit_line(xs, t_touch, all),
            fn = fit_line(xs, t_noflush, above_l2);
  std::printf("\nline fit t = intercept + bytes / slope\n");
  std::printf("  flush:   intercept %7.2f us, slope %5.2f TB/s (%d sizes)\n", ff.intercept_us, ff.tb_s, ff.n);
  std::printf("  touch:   intercept %7.2f us, slope %5.2f TB/s (%d sizes)\n", ft.intercept_us, ft.tb_s, ft.n);
  std::printf("  noflush: intercept %7.2f us, slope %5.2f TB/s (%d sizes > L2)\n", fn.intercept_us,
              fn.tb_s, fn.n);

  // (b) empty kernels: the launch and event floor.
  auto empty = [] {
    empty_kernel<<<1, 32>>>();
    CK_LAUNCH();
  };
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1);
  cfg.blockDim = dim3(32);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // Probe once: a device without programmatic launches refuses the attribute.
  empty_primary_kernel<<<1, 32>>>();
  CK_LAUNCH();
  const bool pdl_ok = cudaLaunchKernelEx(&cfg, empty_dependent_kernel) == cudaSuccess;
  if (!pdl_ok) (void)cudaGetLastError();
  CK(cudaDeviceSynchronize());

  std::printf("\n(b) event span of empty kernels (1 block, 32 threads), us\n");
  std::printf("  one kernel, no flush:                   %7.2f\n", 1e3 * median_ms(ev, nothing, empty));
  std::printf("  one kernel after the flush:             %7.2f\n", 1e3 * median_ms(ev, flush, empty));
  std::printf("  two kernels after the flush:            %7.2f\n",
              1e3 * median_ms(ev, flush, [&] {
                empty();
                empty();
              }));
  if (pdl_ok) {
    std::printf("  kernel + programmatic dependent, flush: %7.2f\n",
                1e3 * median_ms(ev, flush, [&] {
                  empty_primary_kernel<<<1, 32>>>();
                  CK_LAUNCH();
                  CK(cudaLaunchKernelEx(&cfg, empty_dependent_kernel));
                }));
  } else {
    std::printf("  kernel + programmatic dependent, flush:     n/a (attribute refused)\n");
  }

  CK(cudaFree(buf));
  CK(cudaFree(flush_buf));
  CK(cudaFree(sink));
  CK(cudaFree(flush_sink));
  CK(cudaFree(touch_sink));
  return 0;
}
