// Benchmark helpers (include/turboquant/cuda_bench.hpp): events, L2 flush,
// device-side random fill, a read-only bandwidth kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "cuda/bulk_copy.cuh"
#include "cuda/cuda_check.hpp"
#include "turboquant/cuda_bench.hpp"
#include "turboquant/error.hpp"

namespace tq::cuda::bench {
namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Two N(0, 1) samples from one 64-bit hash (Box-Muller on two 24-bit uniforms).
__device__ __forceinline__ float2 normal2(uint64_t seed, uint64_t i) {
  const uint64_t h = splitmix64(seed ^ splitmix64(i));
  const float u1 = (float((h >> 40) & 0xffffffu) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1)
  const float u2 = float((h >> 8) & 0xffffffu) * (1.0f / 16777216.0f);
  const float r = sqrtf(-2.0f * logf(u1));
  float s, c;
  sincospif(2.0f * u2, &s, &c);
  return make_float2(r * c, r * s);
}

__device__ __forceinline__ uint16_t f32_to_bf16_rne(float f) {
  const unsigned u = __float_as_uint(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // finite inputs only
}

__global__ void fill_f32_kernel(float* dst, size_t n, uint64_t seed, float mean, float sd) {
  for (size_t p = blockIdx.x * size_t(blockDim.x) + threadIdx.x; 2 * p < n;
       p += size_t(gridDim.x) * blockDim.x) {
    const float2 z = normal2(seed, p);
    dst[2 * p] = mean + sd * z.x;
    if (2 * p + 1 < n) dst[2 * p + 1] = mean + sd * z.y;
  }
}

__global__ void fill_bf16_kernel(uint16_t* dst, size_t n, uint64_t seed, float mean, float sd) {
  for (size_t p = blockIdx.x * size_t(blockDim.x) + threadIdx.x; 2 * p < n;
       p += size_t(gridDim.x) * blockDim.x) {
    const float2 z = normal2(seed, p);
    dst[2 * p] = f32_to_bf16_rne(mean + sd * z.x);
    if (2 * p + 1 < n) dst[2 * p + 1] = f32_to_bf16_rne(mean + sd * z.y);
  }
}

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ float sum_bf16x8(const uint4& u) {
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) s += __uint_as_float(w[i] << 16) + __uint_as_float(w[i] & 0xffff0000u);
  return s;
}

constexpr int kReadThreads = 256;
constexpr int kReadUnroll = 4;  // 16-byte loads in flight per thread

__global__ void __launch_bounds__(kReadThreads)
    read_sum_kernel(const uint4* __restrict__ src, size_t n_vec, float* sink) {
  const size_t stride = size_t(gridDim.x) * kReadThreads;
  size_t i = blockIdx.x * size_t(kReadThreads) + threadIdx.x;
  float s = 0.0f;
  for (; i + (kReadUnroll - 1) * stride < n_vec; i += kReadUnroll * stride) {
    uint4 v[kReadUnroll];
#pragma unroll
    for (int u = 0; u < kReadUnroll; ++u) v[u] = load_stream(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < kReadUnroll; ++u) s += sum_bf16x8(v[u]);
  }
  for (; i < n_vec; i += stride) s += sum_bf16x8(load_stream(src + i));
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  __shared__ float part[kReadThreads / 32];
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.0f;
    for (int w = 0; w < kReadThreads / 32; ++w) t += part[w];
    atomicAdd(sink, t);
  }
}

// ---- the read floor (cuda_bench.hpp) -------------------------------------------
// Every variant keeps its loads alive through a store that never happens in
// practice (the sum of the data equal to a magic value), so no atomics or
// per-block writes add to the time being measured.
constexpr unsigned kNeverSum = 0x9e3779b9u;

template <bool Hint>
__device__ __forceinline__ uint4 load_floor(const uint4* p) {
  uint4 r;
  if constexpr (Hint)
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
  else
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
  return r;
}

// A thread reads elements begin, begin + step, ... < end, U loads in flight.
// Grid-stride (CHUNKED false): at each step the grid reads one contiguous
// window. CHUNKED: each block reads one contiguous chunk of the buffer.
template <int U, bool Hint, bool Chunked>
__global__ void __launch_bounds__(kReadThreads)
    read_floor_kernel(const uint4* __restrict__ src, size_t n_vec, unsigned* sink) {
  size_t i, end, step;
  if constexpr (Chunked) {
    const size_t per = (n_vec + gridDim.x - 1) / gridDim.x, b0 = blockIdx.x * per;
    i = b0 + threadIdx.x;
    end = b0 + per < n_vec ? b0 + per : n_vec;
    step = kReadThreads;
  } else {
    i = blockIdx.x * size_t(kReadThreads) + threadIdx.x;
    end = n_vec;
    step = size_t(gridDim.x) * kReadThreads;
  }
  unsigned s = 0;
  for (; i + (U - 1) * step < end; i += U * step) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = load_floor<Hint>(src + i + u * step);
#pragma unroll
    for (int u = 0; u < U; ++u) s += v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < end; i += step) {
    const uint4 v = load_floor<Hint>(src + i);
    s += v.x ^ v.y ^ v.z ^ v.w;
  }
  if (s == kNeverSum) *sink = s;
}

// sm_90 bulk copies: lane 0 of each warp keeps kBulkStages copies of
// kBulkBytes in flight into its own shared memory, completing on one
// mbarrier per stage; nothing reads the shared memory (the copy is the read).
constexpr int kBulkWarps = 4, kBulkStages = 4;
constexpr uint32_t kBulkBytes = 8192;
constexpr int kBulkSmem = kBulkWarps * kBulkStages * int(kBulkBytes);

__global__ void __launch_bounds__(32 * kBulkWarps)
    read_bulk_kernel(const uint8_t* __restrict__ src, size_t bytes, unsigned* sink) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t bars[kBulkWarps * kBulkStages];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t n_chunks = (bytes + kBulkBytes - 1) / kBulkBytes;
  const size_t first = size_t(blockIdx.x) * kBulkWarps + warp, step = size_t(gridDim.x) * kBulkWarps;
  const uint32_t sbase = static_cast<uint32_t>(__cvta_generic_to_shared(smem)) +
                         uint32_t(warp) * kBulkStages * kBulkBytes;
  const uint32_t bbase = static_cast<uint32_t>(__cvta_generic_to_shared(bars)) + 8u * warp * kBulkStages;
  auto issue = [&](size_t c, int st) {
    const size_t off = c * kBulkBytes;
    const uint32_t n = bytes - off < kBulkBytes ? uint32_t(bytes - off) : kBulkBytes;
    const uint32_t bar = bbase + 8u * st;
    bulk::mbar_expect_tx(bar, n);
    bulk::copy_g2s(sbase + uint32_t(st) * kBulkBytes, src + off, n, bar);
  };
  if (lane == 0) {
    for (int st = 0; st < kBulkStages; ++st) bulk::mbar_init(bbase + 8u * st, 1u);
    bulk::fence_mbar_init();
    for (int st = 0; st < kBulkStages; ++st)
      if (first + st * step < n_chunks) issue(first + st * step, st);
  }
  __syncwarp();
  unsigned done = 0;
  size_t k = 0;
  for (size_t c = first; c < n_chunks; c += step, ++k) {
    const int st = int(k % kBulkStages);
    bulk::mbar_wait(bbase + 8u * st, uint32_t(k / kBulkStages) & 1u);
    ++done;
    if (lane == 0 && c + kBulkStages * step < n_chunks) issue(c + kBulkStages * step, st);
  }
  if (done == kNeverSum) *sink = done;
#else
  (void)src;
  (void)bytes;
  (void)sink;
#endif
}

int grid_for(size_t work_items, int threads) {
  int dev = 0, sms = 0;
  TQ_CUDA_CHECK(cudaGetDevice(&dev));
  TQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const size_t want = (work_items + threads - 1) / threads;
  return int(std::max<size_t>(1, std::min<size_t>(want, size_t(sms) * 8)));
}

cudaEvent_t ev(void* p) { return static_cast<cudaEvent_t>(p); }

}  // namespace

bool built_with_cuda() { return true; }

DeviceInfo device_info() {
  TQ_REQUIRE(cuda_available(), "no CUDA device");
  int dev = 0;
  TQ_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  TQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  DeviceInfo d;
  d.name = prop.name;
  d.cc_major = prop.major;
  d.cc_minor = prop.minor;
  d.sm_count = prop.multiProcessorCount;
  d.l2_bytes = size_t(prop.l2CacheSize);
  TQ_CUDA_CHECK(cudaMemGetInfo(&d.free_bytes, &d.total_bytes));
  return d;
}

EventTimer::EventTimer(int n) {
  TQ_REQUIRE(n >= 1, "EventTimer: n must be >= 1, got ", n);
  for (int i = 0; i < n; ++i) {
    cudaEvent_t a = nullptr, b = nullptr;
    TQ_CUDA_CHECK(cudaEventCreate(&a));
    start_.push_back(a);
    TQ_CUDA_CHECK(cudaEventCreate(&b));
    stop_.push_back(b);
  }
}
EventTimer::~EventTimer() {
  for (void* e : start_) (void)cudaEventDestroy(ev(e));
  for (void* e : stop_) (void)cudaEventDestroy(ev(e));
}
void EventTimer::start(int i, Stream stream) {
  TQ_CUDA_CHECK(cudaEventRecord(ev(start_.at(i)), static_cast<cudaStream_t>(stream)));
}
void EventTimer::stop(int i, Stream stream) {
  TQ_CUDA_CHECK(cudaEventRecord(ev(stop_.at(i)), static_cast<cudaStream_t>(stream)));
}
float EventTimer::ms(int i) const {
  TQ_CUDA_CHECK(cudaEventSynchronize(ev(stop_.at(i))));
  float t = 0.0f;
  TQ_CUDA_CHECK(cudaEventElapsedTime(&t, ev(start_.at(i)), ev(stop_.at(i))));
  return t;
}
std::vector<float> EventTimer::all_ms() const {
  std::vector<float> t(start_.size());
  for (size_t i = 0; i < t.size(); ++i) t[i] = ms(int(i));
  return t;
}
double EventTimer::median_ms() const {
  std::vector<float> t = all_ms();
  std::sort(t.begin(), t.end());
  const size_t n = t.size();
  return n % 2 ? t[n / 2] : 0.5 * (double(t[n / 2 - 1]) + t[n / 2]);
}

// The flush reads (never writes) a buffer > 4x the L2: afterwards L2 holds
// only clean lines of it, so no write-back of earlier data falls inside the
// next timed region, and none of the timed kernel's data is cached. (It was
// a memset: L2 then held dirty lines whose write-back the timed kernel paid.)
L2Flusher::L2Flusher(size_t bytes) {
  if (bytes == 0) bytes = std::max<size_t>(size_t(256) << 20, 4 * device_info().l2_bytes);
  bytes = (bytes + 15) / 16 * 16;
  buf_ = DeviceBuffer(bytes);
  TQ_CUDA_CHECK(cudaMemset(buf_.data(), 0, bytes));  // once, outside any timing
  sink_ = DeviceBuffer(sizeof(float));
  TQ_CUDA_CHECK(cudaMemset(sink_.data(), 0, sizeof(float)));
  TQ_CUDA_CHECK(cudaDeviceSynchronize());
}
void L2Flusher::flush(Stream stream) { read_sum_bf16(buf_.data(), buf_.size(), sink_.as<float>(), stream); }

void fill_normal_f32(float* dst, size_t n, uint64_t seed, float mean, float sd, Stream stream) {
  if (n == 0) return;
  fill_f32_kernel<<<grid_for((n + 1) / 2, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      dst, n, seed, mean, sd);
  TQ_CUDA_CHECK_LAUNCH();
}

void fill_normal_bf16(uint16_t* dst, size_t n, uint64_t seed, float mean, float sd, Stream stream) {
  if (n == 0) return;
  fill_bf16_kernel<<<grid_for((n + 1) / 2, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      dst, n, seed, mean, sd);
  TQ_CUDA_CHECK_LAUNCH();
}

void read_sum_bf16(const void* src, size_t bytes, float* sink, Stream stream) {
  TQ_REQUIRE(bytes % 16 == 0 && (reinterpret_cast<uintptr_t>(src) & 15u) == 0,
             "read_sum_bf16: ", bytes, " bytes at ", src, ": need a 16-byte aligned multiple of 16");
  if (bytes == 0) return;
  const size_t n_vec = bytes / 16;
  read_sum_kernel<<<grid_for(n_vec, kReadThreads), kReadThreads, 0,
                    static_cast<cudaStream_t>(stream)>>>(static_cast<const uint4*>(src), n_vec, sink);
  TQ_CUDA_CHECK_LAUNCH();
}

const char* read_floor_name(int variant) {
  static const char* const kNames[kReadFloorVariants] = {"stride4", "stride8", "chunk8", "bulk"};
  TQ_REQUIRE(variant >= 0 && variant < kReadFloorVariants, "read_floor: variant ", variant, " is not 0..",
             kReadFloorVariants - 1);
  return kNames[variant];
}

// Cached: read_floor runs between the caller's events, where host time counts.
bool read_floor_supported(int variant) {
  read_floor_name(variant);  // range check
  if (variant != 3) return true;
  static std::atomic<int> major{0};
  if (major.load() == 0) {
    int dev = 0, m = 0;
    TQ_CUDA_CHECK(cudaGetDevice(&dev));
    TQ_CUDA_CHECK(cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev));
    major = m;
  }
  return major.load() >= 9;
}

void read_floor(const void* src, size_t bytes, unsigned* sink, int variant, Stream stream) {
  TQ_REQUIRE(bytes % 16 == 0 && (reinterpret_cast<uintptr_t>(src) & 15u) == 0, "read_floor: ", bytes,
             " bytes at ", src, ": need a 16-byte aligned multiple of 16");
  TQ_REQUIRE(read_floor_supported(variant), "read_floor: variant ", read_floor_name(variant),
             " needs compute capability 9.0 or newer");
  if (bytes == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const auto* v = static_cast<const uint4*>(src);
  const size_t n_vec = bytes / 16;
  const int grid = grid_for(n_vec, kReadThreads);
  switch (variant) {
    case 0:
      read_floor_kernel<4, true, false><<<grid, kReadThreads, 0, s>>>(v, n_vec, sink);
      break;
    case 1:
      read_floor_kernel<8, false, false><<<grid, kReadThreads, 0, s>>>(v, n_vec, sink);
      break;
    case 2:
      read_floor_kernel<8, false, true><<<grid, kReadThreads, 0, s>>>(v, n_vec, sink);
      break;
    default: {
      static std::atomic<int> blocks{0};  // resident blocks, found once
      if (blocks.load() == 0) {
        int dev = 0, sms = 0, per_sm = 0;
        TQ_CUDA_CHECK(cudaGetDevice(&dev));
        TQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
        TQ_CUDA_CHECK(cudaFuncSetAttribute(read_bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBulkSmem));
        TQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, read_bulk_kernel, 32 * kBulkWarps,
                                                                    kBulkSmem));
        blocks = std::max(1, per_sm) * sms;
      }
      const size_t chunks = (bytes + kBulkBytes - 1) / kBulkBytes;
      const int g = int(std::min<size_t>(size_t(blocks.load()), (chunks + kBulkWarps - 1) / kBulkWarps));
      read_bulk_kernel<<<g, 32 * kBulkWarps, kBulkSmem, s>>>(static_cast<const uint8_t*>(src), bytes, sink);
    }
  }
  TQ_CUDA_CHECK_LAUNCH();
}

CapturedGraph::CapturedGraph() {
  cudaStream_t s = nullptr;
  TQ_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  stream_ = s;
}
CapturedGraph::~CapturedGraph() {
  if (exec_ != nullptr) (void)cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  if (graph_ != nullptr) (void)cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
  if (stream_ != nullptr) (void)cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}
Stream CapturedGraph::stream() const { return static_cast<Stream>(stream_); }
void CapturedGraph::begin_capture() {
  TQ_REQUIRE(graph_ == nullptr, "CapturedGraph: a graph was captured already");
  TQ_CUDA_CHECK(cudaStreamBeginCapture(static_cast<cudaStream_t>(stream_), cudaStreamCaptureModeThreadLocal));
}
void CapturedGraph::end_capture() {
  cudaGraph_t g = nullptr;
  TQ_CUDA_CHECK(cudaStreamEndCapture(static_cast<cudaStream_t>(stream_), &g));
  graph_ = g;
  cudaGraphExec_t e = nullptr;
  TQ_CUDA_CHECK(cudaGraphInstantiate(&e, g, 0));
  exec_ = e;
}
void CapturedGraph::replay() {
  launch();
  TQ_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
}
void CapturedGraph::launch() {
  TQ_REQUIRE(exec_ != nullptr, "CapturedGraph: nothing captured (begin_capture, calls, end_capture first)");
  TQ_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), static_cast<cudaStream_t>(stream_)));
}

void copy_d2d(void* dst, const void* src, size_t bytes, Stream stream) {
  TQ_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice,
                                static_cast<cudaStream_t>(stream)));
}

void synchronize(Stream stream) {
  TQ_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}

}  // namespace tq::cuda::bench
