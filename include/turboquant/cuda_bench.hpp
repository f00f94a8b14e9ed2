// Measuring GPU code the way CONVENTIONS.md asks (CUDA events, L2 flushed,
// medians, bandwidth as a share of a copy measured in the same run), for
// callers without CUDA headers: tq gpu-bench and tests. Everything throws
// tq::Error in a build without CUDA (built_with_cuda() tells that case apart
// from "no device").
//
//   tq::cuda::bench::L2Flusher flush;              // reads > 4x the L2
//   tq::cuda::bench::EventTimer timer(runs);
//   for (int i = 0; i < runs; ++i) {
//     flush.flush(stream);
//     timer.start(i, stream);  launch();  timer.stop(i, stream);
//   }
//   double ms = timer.median_ms();                 // waits for the last event
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "turboquant/cuda.hpp"

namespace tq::cuda::bench {

bool built_with_cuda();

struct DeviceInfo {
  std::string name;
  int cc_major = 0, cc_minor = 0;
  int sm_count = 0;
  size_t l2_bytes = 0;
  size_t free_bytes = 0, total_bytes = 0;  // cudaMemGetInfo at the call
};
DeviceInfo device_info();  // the current device; throws tq::Error without one

// n pairs of CUDA events.
class EventTimer {
 public:
  explicit EventTimer(int n);
  ~EventTimer();
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  int size() const { return static_cast<int>(start_.size()); }
  void start(int i, Stream stream);
  void stop(int i, Stream stream);
  float ms(int i) const;      // waits for stop event i
  double median_ms() const;   // of all n pairs
  std::vector<float> all_ms() const;

 private:
  std::vector<void*> start_, stop_;  // cudaEvent_t
};

// A device buffer READ before each timed run (a kernel sums it into a tiny
// sink), so that the run starts with none of its data in L2 and with L2
// holding clean lines only. (A memset flush leaves L2 full of dirty lines
// whose write-back then lands inside the timed region.) scripts/sdpa_bench.py
// flushes the same way: a reduction over a buffer of the same size.
// bytes = 0: max(256 MiB, 4 x the L2).
class L2Flusher {
 public:
  explicit L2Flusher(size_t bytes = 0);
  void flush(Stream stream);
  size_t bytes() const { return buf_.size(); }

 private:
  DeviceBuffer buf_, sink_;
};

// The quantize-append kernels of a GpuKvLayer alone, for timing them apart
// from append()'s host work (tile list, upload, status readback, one stream
// synchronisation): rewrites the records of tokens [0, n_tokens) of
// sequence seq, which must hold at least n_tokens, from k and v. run()
// launches the K and V kernels on `stream` and returns; it never
// synchronises, checks no status and leaves the layer's bookkeeping alone
// (the same input rewrites the same bytes).
class AppendKernels {
 public:
  AppendKernels(GpuKvLayer& layer, int seq, int n_tokens);
  ~AppendKernels();
  AppendKernels(const AppendKernels&) = delete;
  AppendKernels& operator=(const AppendKernels&) = delete;
  // k, v: device [n_tokens, n_heads_kv, head_dim] of dtype, 16-byte aligned.
  void run(const void* k, const void* v, DType dtype, Stream stream);
  int n_tiles() const;  // blocks' work items per kernel

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// Fills device memory with N(mean, sd) samples from a counter-based hash of
// (seed, index): the same on every device and launch shape.
void fill_normal_f32(float* dst, size_t n, uint64_t seed, float mean, float sd, Stream stream);
void fill_normal_bf16(uint16_t* dst, size_t n, uint64_t seed, float mean, float sd, Stream stream);

// A pure read stream: reads `bytes` (a multiple of 16, 16-byte aligned) of
// bf16 values once and adds their sum into *sink (device float). The
// bandwidth ceiling for kernels that read and write next to nothing.
void read_sum_bf16(const void* src, size_t bytes, float* sink, Stream stream);
// The read floor: pure read streams of `bytes` (a multiple of 16, 16-byte
// aligned) in different access patterns, each summing what it reads into
// *sink (device, one word). No kernel that must read those bytes can finish,
// in the same harness (flush, event, launch, event), before the fastest of
// them: tq gpu-bench reports each kernel's time against that floor, and the
// largest speedup over a baseline that any kernel could show.
//   0 stride4: grid-stride, 4 x 16-byte loads in flight a thread, L2 256-byte
//     prefetch hint (read_sum_bf16's pattern);
//   1 stride8: the same with 8 loads in flight and no prefetch hint;
//   2 chunk8: each block one contiguous chunk, 8 loads in flight a thread;
//   3 bulk: sm_90 bulk copies (one lane a warp, 8 KiB each, 4 in flight a
//     warp) into shared memory, as the decode kernel reads its pages.
// read_floor_supported(v) is false where the device cannot run a variant.
constexpr int kReadFloorVariants = 4;
const char* read_floor_name(int variant);
bool read_floor_supported(int variant);
void read_floor(const void* src, size_t bytes, unsigned* sink, int variant, Stream stream);
// A stream of its own and one CUDA graph captured on it, for tests of calls
// that claim to be capture-safe (GpuKvLayer::attend, dense_decode_bf16):
//   CapturedGraph g;  g.begin_capture();  call(g.stream());  g.end_capture();
//   g.replay();  // as often as wanted; each replay waits for the graph
class CapturedGraph {
 public:
  CapturedGraph();
  ~CapturedGraph();
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  Stream stream() const;
  void begin_capture();  // thread-local capture mode
  void end_capture();    // ends the capture and instantiates the graph
  void replay();         // launches the graph on stream() and synchronises it
  void launch();         // launches the graph on stream() without waiting (for timing back-to-back replays)
 private:
  void* stream_ = nullptr;  // cudaStream_t
  void* graph_ = nullptr;   // cudaGraph_t
  void* exec_ = nullptr;    // cudaGraphExec_t
};
// cudaMemcpyAsync device to device.
void copy_d2d(void* dst, const void* src, size_t bytes, Stream stream);
void synchronize(Stream stream);

}  // namespace tq::cuda::bench
