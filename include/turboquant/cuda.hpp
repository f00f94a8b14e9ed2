// The GPU side of the KV cache: one layer's pages in device memory, in the
// SAME record and page format as the CPU cache (format.hpp, kv_cache.hpp),
// written by a quantize-append kernel whose codes are bit-identical to the
// CPU quantizer, and read by a split-KV decode attention kernel that scores
// straight from the codes. Beside it, dense_decode_bf16: the same decode over
// a plain bf16 cache, the baseline the compressed kernels are measured against.
//
// Formats on the GPU (this step): tq-mse with an integer bit width 1..8,
// scale=norm, sf=f16|f32, rot=hadamard, head_dim 64, 128 or 256.
// Input to the append: f32, f16 or bf16 (DType), from host or device memory;
// every element is first rounded to GpuKvLayerConfig::round_to (f16 by
// default, as KvCache rounds each token to its dense_format), so that the GPU
// and a KvCache of the same formats write the same bytes for the same input.
//
// The API is always present; in a build without CUDA cuda_available() is
// false and everything else throws tq::Error.
//
//   auto kq = tq::make_quantizer("tq-mse:b=4", 128, 1), vq = ...;
//   tq::cuda::GpuKvLayerConfig cfg;  cfg.n_heads_kv = 8; cfg.max_seqs = 4;
//   tq::cuda::GpuKvLayer layer(*kq, *vq, cfg);
//   int s = layer.add_sequence();
//   layer.append(s, k, v, n_tokens);               // host f32 [n_tokens, n_heads_kv, 128]
//   layer.append_device(s, k_bf16, v_bf16, n_tokens, tq::cuda::DType::bf16, stream);
//   tq::cuda::DeviceBuffer ws(layer.workspace_bytes(32));   // plan: once
//   layer.attend(q_dev, 32, {}, out_dev, nullptr, ws.data(), ws.size());  // run: no allocation
//   layer.attend(q_bf16, DType::bf16, 32, {}, out_bf16, DType::bf16, nullptr, ws.data(), ws.size());
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "turboquant/attention.hpp"
#include "turboquant/quantizer.hpp"

struct CUstream_st;  // cudaStream_t is CUstream_st*; this header needs no CUDA headers

namespace tq::cuda {

using Stream = CUstream_st*;  // nullptr: the legacy default stream

// Element types of appended K/V and of attend's query and output. f16 and
// bf16 are raw 16-bit patterns (IEEE binary16, bfloat16), little-endian, as
// engines hold them.
enum class DType { f32, f16, bf16 };
const char* to_string(DType t);
size_t dtype_bytes(DType t);  // 4, 2, 2

namespace bench {
class AppendKernels;  // cuda_bench.hpp: times the append kernels alone
}

// Where GpuKvLayer::attend plans the splits of its tensor-core kernel (how
// many tokens each block takes). A plan made on the host from the lengths it
// knows is frozen into a CUDA graph by stream capture: a graph captured while
// the sequences were short would keep short splits as they grow (Llama-3-8B's
// layer at 1 x 128K then takes twice the rounds). A device plan is the same
// cost model run by the kernel itself from the lengths on the device.
//  - automatic: on the device for a call under stream capture, else on the
//    host (the default);
//  - host / device: always there (process-wide; for comparing the two).
enum class SplitPlanning : int { automatic = 0, host = 1, device = 2 };
void set_decode_split_planning(SplitPlanning mode);
SplitPlanning decode_split_planning();

// True when the library was built with CUDA and a device is usable.
bool cuda_available();
int cuda_device_count();             // 0 without CUDA or without a device
std::string cuda_device_name(int device = 0);  // throws tq::Error if there is none

// A plain device allocation (cudaMalloc), for callers without CUDA headers:
// tests, tools, the workspace of attend().
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return ptr_; }
  size_t size() const { return bytes_; }
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }
  // Synchronous copies of `bytes` (<= size()) from / to host memory.
  void upload(const void* host, size_t bytes);
  void download(void* host, size_t bytes) const;

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct GpuKvLayerConfig {
  int n_heads_kv = 1;
  int page_tokens = 256;
  int max_seqs = 1;             // sequences attended together (attend's batch)
  int max_pages_per_seq = 64;   // capacity per sequence: max_pages_per_seq * page_tokens tokens
  int max_pages = 0;            // device page pool; 0 = max_seqs * max_pages_per_seq
  int split_pages = 4;          // pages per split-KV part of attend()
  // Every appended element is rounded to this format before it is encoded,
  // as KvCache::append encodes each token from its dense_format value: f16
  // (KvCacheConfig's default dense_format) by round to nearest even, with
  // |x| > 65504 refused like KvCache refuses it; bf16 likewise (no range
  // limit); f32: no rounding, records are kq/vq.encode_one of the input as
  // given. Set it to the KvCache's dense_format to get the KvCache's bytes.
  DType round_to = DType::f16;
  // Dense tokens, as KvCacheConfig::dense_window / dense_prefix: the newest
  // dense_window tokens of each sequence and its first dense_prefix tokens
  // stay in f16 outside the pages (needs round_to f16, KvCache's default
  // dense format) and attend() joins them through the merge; a token leaving
  // the window is quantized into the pages from its f16 value, so the records
  // are those of a KvCache with the same window and prefix (every append
  // path; append_records refuses: such a layer's first and newest tokens are
  // dense, not records).
  int dense_window = 0;
  int dense_prefix = 0;
  // A sliding-window layer (as KvCacheConfig::sliding_window, e.g. Gemma's
  // local layers), W > 0: attend() then takes AttentionParams::window in
  // 1..W and no sinks (anything else is refused), and the layer gives the
  // pages no later query can see back to the pool, so a sequence holds about
  // W + 32 + page_tokens tokens of pages however long it grows: size
  // max_pages for that. Pages are freed at the start of each synchronous
  // call (append*, append_records, read_records, download_page,
  // reserve_steps) and at check_appends(), never while an append is
  // unchecked. The dense prefix, if any, stays. 0: keeps every token.
  int sliding_window = 0;
  // Channel-split formats (fractional b, or hi=N,hb=B: turbo2.5, turbo3.5,
  // turbo4-out, paper_mse-out): per KV head, the channels coded at the
  // higher width (e.g. a loaded KvCache's KvCache::outlier_channels).
  // Empty: the layer chooses them itself, per head, by KvCache's rule (the
  // channels of largest mean square over the first tokens it compresses, up
  // to 4096 of the first append that reaches the pages; one extra
  // synchronisation, once), so that the same appends give KvCache's records.
  // turbo2.5 / turbo3.5 (K and V split into two halves at b and b - 1 bits)
  // decode on the tensor-core kernel; the other splits (outlier channels,
  // f32 scales, one side only) on the reference kernel (kernels.hpp;
  // attend_kernel says which).
  std::vector<std::vector<int>> k_hi_channels, v_hi_channels;
};

// One layer of a paged KV cache on the device. Page layout as on the CPU:
// [K: head, slot, k record][V: head, slot, v record], page_tokens slots each.
class GpuKvLayer {
 public:
  // kq, vq: the CPU quantizers of the layer's K and V formats (e.g.
  // KvCache::k_quantizer(layer)). Their rotation signs and codebooks are
  // copied, so the device writes exactly the records kq/vq would encode.
  // Throws tq::Error for a format or shape the GPU path does not support.
  GpuKvLayer(const Quantizer& kq, const Quantizer& vq, const GpuKvLayerConfig& cfg);
  ~GpuKvLayer();
  GpuKvLayer(const GpuKvLayer&) = delete;
  GpuKvLayer& operator=(const GpuKvLayer&) = delete;

  const GpuKvLayerConfig& config() const;
  int head_dim() const;
  size_t k_record_bytes() const;
  size_t v_record_bytes() const;
  size_t page_bytes() const;  // page_tokens * n_heads_kv * (k + v record bytes)

  int add_sequence();   // ids 0, 1, 2, ...; throws past max_seqs
  int n_seqs() const;
  int n_tokens(int seq) const;  // all of them: dense prefix + pages + dense window
  int n_pages(int seq) const;   // pages its tokens span, freed ones included (reserve_steps may hold more)
  // The first token position whose record the pages still hold: the dense
  // prefix's length, or later where a sliding window freed pages.
  // read_records and download_page refuse what lies before it.
  int first_record(int seq) const;

  // Quantize-append of tokens at positions n_tokens(seq) ... Records are
  // kq/vq.encode_one of the input rounded to config().round_to (f16 by
  // default: then f32 input gives the bytes KvCache::append writes for it,
  // and f16 input exactly those of its values). Throws tq::Error (the
  // sequence unchanged) on a NaN/Inf component, a component beyond the f16
  // range under round_to f16, an fp16 scale overflow (norm > 65504 with
  // sf=f16) or a full sequence / page pool. Synchronous: it waits for the
  // device status (one stream synchronisation per call).
  // k, v: [n_tokens, n_heads_kv, head_dim], host memory
  void append(int seq, const float* k, const float* v, int n_tokens);
  void append(int seq, const void* k, const void* v, int n_tokens, DType dtype);
  // The same from device memory, ordered on `stream`. A pointer that is not
  // 16-byte aligned is first copied to an aligned scratch buffer.
  void append_device(int seq, const float* k, const float* v, int n_tokens,
                     Stream stream = nullptr);
  void append_device(int seq, const void* k, const void* v, int n_tokens, DType dtype,
                     Stream stream = nullptr);
  // One decode token for each of n sequences seqs[0..n-1] (distinct): what
  // an engine calls for every layer at every step. One status readback per
  // call (one stream synchronisation), dense tokens or not; a refusal (NaN /
  // Inf, f16 overflow of the dense rows, a full page budget) leaves every
  // sequence of the batch unchanged.
  // k, v: device [n, n_heads_kv, head_dim]
  void append_batch_device(const int* seqs, int n, const float* k, const float* v,
                           Stream stream = nullptr);
  void append_batch_device(const int* seqs, int n, const void* k, const void* v, DType dtype,
                           Stream stream = nullptr);
  // The same without waiting for the device: nothing is read back, so an
  // engine pays no synchronisation per layer and step. What the host can
  // check (sequences, capacity, page pool, null input) still throws here,
  // the layer unchanged. What only the device finds (NaN/Inf, f16 overflow,
  // an fp16 scale overflow) is kept in an error word on the device: the
  // refused call and every later asynchronous append of the layer are then
  // dropped on the device (attend() keeps seeing what was there before),
  // and the next check_appends() -- or any synchronous call of the layer:
  // append*, append_records, read_records, download_page -- throws tq::Error
  // after bringing the layer back to what it held before the refused call.
  // Until then n_tokens() counts these tokens as appended. All asynchronous
  // appends of a layer between two checks go on one stream (another stream
  // checks first).
  void append_batch_device_async(const int* seqs, int n, const float* k, const float* v,
                                 Stream stream = nullptr);
  void append_batch_device_async(const int* seqs, int n, const void* k, const void* v, DType dtype,
                                 Stream stream = nullptr);
  // Waits for the asynchronous appends and throws the refusal among them,
  // if any (see above). Call it once per decode step, or less often. After
  // captured steps (below) it waits for the whole device and brings
  // n_tokens() up to the device's lengths.
  void check_appends();

  // ---- Decode steps inside a CUDA graph ------------------------------------
  // The appends above are planned on the host at every call (pages, tiles,
  // an upload), so a stream capture cannot hold them. For a decode step an
  // engine captures once and replays (append, then attend, per layer):
  //   layer.reserve_steps(seqs, n, 256);          // host, outside the capture
  //   cudaStreamBeginCapture(s, ...);
  //   layer.append_step_device(k, v, DType::bf16, s);   // capture-safe
  //   layer.attend(q, n_heads_q, params, out, lse, ws, ws_bytes, s);
  //   cudaStreamEndCapture(s, &graph);  ... replay it for up to 256 steps ...
  //   layer.check_appends();                      // n_tokens() catches up
  // reserve_steps: the batch of the steps is sequences seqs[0..n-1]
  // (distinct, host memory), in that order; each gets the pages for `steps`
  // more tokens now (from the pool, on the host) and may grow by steps up
  // to n_tokens(seq) + steps tokens. With dense_window / dense_prefix, each
  // step also moves the dense tokens on the device as append_batch_device
  // does (prefix, ring, the ring's oldest token into the pages); the pages
  // reserved are those of `steps` more compressed tokens, and a step whose
  // token stays dense needs none (it is never refused for the reservation).
  // Throws tq::Error (nothing changed) for a channel split whose hi
  // channels are not chosen yet, a sequence past its capacity or a pool
  // without the pages. Synchronous (settles earlier appends first).
  void reserve_steps(const int* seqs, int n, int steps);
  // One token for each sequence of the reserved batch, rows of k, v
  // (device [n, n_heads_kv, head_dim] of dtype, 16-byte aligned) in the
  // batch's order, at each sequence's current end as the device knows it;
  // the same records as append_batch_device. Nothing is read from or
  // written to the host and nothing is allocated, so the call may be
  // captured: each replay reads the lengths and page tables on the device
  // and commits the new lengths there (attend sees them). A step that would
  // pass a reserved limit, or whose values are refused (NaN/Inf, f16
  // overflow, an fp16 scale overflow), is dropped on the device with every
  // later asynchronous append and step, and the next check_appends() throws
  // (the layer keeps every token appended before it; the reservations are
  // given up). Until that check, n_tokens() does not count the steps.
  void append_step_device(const void* k, const void* v, DType dtype, Stream stream = nullptr);
  // Which kernels a captured step's append runs: "step kernel: ..." (one
  // launch, a warp per vector: tq-mse K and V, two-halves splits, or
  // outlier channels in K beside a tq-mse V) or "tile kernels: <why>".
  std::string step_kernel() const;
  // A channel-split format's hi channels of a KV head (K or V), as given or
  // as the layer chose them; empty for other formats and while not chosen.
  std::vector<int> hi_channels(int head, bool key) const;

  // The bytes of page `page` of a sequence (to compare with, or load into, a
  // CPU cache). out: [page_bytes()] host memory; slots past n_tokens are unspecified.
  void download_page(int seq, int page, uint8_t* out) const;

  // Already-encoded records in and out, host memory, in the layout of
  // KvCache::read_records / append_records: k [n, n_heads_kv,
  // k_record_bytes()], v likewise. The bytes are the same on both sides, so a
  // KvCache layer (saved and loaded, say) moves to the GPU and back:
  //   cache.read_records(seq, layer, 0, n, k, v);  gpu.append_records(s, k, v, n);
  // append_records refuses a record whose scale is not finite (tq::Error, the
  // sequence unchanged). Synchronous.
  void append_records(int seq, const uint8_t* k, const uint8_t* v, int n_tokens);
  void read_records(int seq, int t0, int n_tokens, uint8_t* k, uint8_t* v) const;

  // ---- Decode attention: plan / run ---------------------------------------
  // Workspace of attend() for n_heads_q query heads (a multiple of n_heads_kv).
  size_t workspace_bytes(int n_heads_q) const;
  // Which decode kernel attend() runs for n_heads_q query heads:
  // "tensor_core", or "reference: <why the tensor-core kernel cannot>"
  // (e.g. a channel-split format, another bit width, f32 scales).
  std::string attend_kernel(int n_heads_q) const;
  // One query token per sequence 0..n_seqs()-1, at its last position (causal,
  // window, sinks and softcap from params). Never allocates; ordered on
  // `stream`. q, out: device [n_seqs(), n_heads_q, head_dim]; lse: device
  // [n_seqs(), n_heads_q] or nullptr. A sequence with no visible key gives
  // out = 0, lse = -inf. With a window and no sinks the work (and the
  // partials the merge reads) scale with the window, not the context. A
  // sliding_window layer refuses a window of 0 or above it, and sinks.
  // Captured in a CUDA graph, the tensor-core kernel plans its splits from
  // the lengths on the device at every replay (SplitPlanning), so a graph
  // captured at short lengths runs as a fresh call does at any later length.
  void attend(const float* q, int n_heads_q, const AttentionParams& params, float* out,
              float* lse, void* workspace, size_t workspace_bytes, Stream stream = nullptr) const;
  // The same with q of q_dtype and out of out_dtype (f32, f16 or bf16 each;
  // lse stays f32), so a bf16 engine needs no conversion kernels of its own:
  // the last kernel writes out in its type (rounded to nearest even), and a
  // 16-bit q is widened to f32 in the workspace by one small kernel first
  // (+0.2 to 1.7 us a call on the H200; docs/benchmarks.md). The result is
  // that of the f32 call with q's values, out rounded.
  void attend(const void* q, DType q_dtype, int n_heads_q, const AttentionParams& params, void* out,
              DType out_dtype, float* lse, void* workspace, size_t workspace_bytes,
              Stream stream = nullptr) const;

  struct Impl;

 private:
  friend class bench::AppendKernels;
  std::unique_ptr<Impl> impl_;
};

// ---- Dense bf16 decode attention: the speed baseline ---------------------------
// Split-KV (flash-decoding) attention of one query token per sequence over a
// dense bf16 cache laid out as engines usually keep it, contiguous per head:
//   k, v: [batch, n_heads_kv, max_ctx, head_dim] bf16 (raw bits), head_dim 64/128/256.
// Sequence b attends to its tokens 0 .. lengths[b]-1 (its query is the last
// position, so all of them are visible); the GQA group of a KV head shares
// every K/V row it loads. fp32 online softmax; out is fp32. Same plan / run
// split as GpuKvLayer: the plan picks the split count for the device once, the
// run never allocates (capture-safe) and uses a caller-owned workspace.
//
//   tq::cuda::DenseDecodeArgs a;
//   a.batch = 8; a.n_heads_q = 32; a.n_heads_kv = 8; a.head_dim = 128; a.max_ctx = 32768;
//   a.k = k_dev; a.v = v_dev; a.lengths = len_dev; a.q = q_dev; a.out = out_dev;
//   tq::cuda::DenseDecodePlan plan = tq::cuda::dense_decode_plan(a);   // once per shape
//   tq::cuda::DeviceBuffer ws(plan.workspace_bytes);
//   tq::cuda::dense_decode_bf16(a, plan, ws.data(), ws.size(), stream);  // no allocation
enum class DenseQType { f32, bf16 };

struct DenseDecodeArgs {
  int batch = 0;
  int n_heads_q = 0;               // a multiple of n_heads_kv
  int n_heads_kv = 0;
  int head_dim = 0;                // 64, 128 or 256
  int max_ctx = 0;                 // token stride of k and v (capacity per head)
  int max_len = 0;                 // the plan's size hint: largest lengths[b] (0: max_ctx).
                                   // Longer sequences (<= max_ctx) still come out right, slower.
  const uint16_t* k = nullptr;     // device [batch, n_heads_kv, max_ctx, head_dim] bf16, 16-byte aligned
  const uint16_t* v = nullptr;     // device, as k
  const int* lengths = nullptr;    // device [batch]; clamped to [0, max_ctx]
  const void* q = nullptr;         // device [batch, n_heads_q, head_dim] of q_type, 16-byte aligned
  DenseQType q_type = DenseQType::f32;
  float* out = nullptr;            // device [batch, n_heads_q, head_dim]; 0 for an empty sequence
  float* lse = nullptr;            // device [batch, n_heads_q] (natural log; -inf if empty) or nullptr
  float scale = 0.0f;              // softmax scale; 0 means 1/sqrt(head_dim)
};

struct DenseDecodePlan {
  // The shape it was made for (dense_decode_bf16 checks it).
  int batch = 0, n_heads_q = 0, n_heads_kv = 0, head_dim = 0, max_ctx = 0;
  int heads_per_block = 0;   // query heads of one GQA group served by one block (<= 8)
  int n_head_blocks = 0;     // blocks per KV head (K/V rows are read this many times)
  int n_splits = 0;          // context splits per sequence (1: no merge pass)
  int split_tokens = 0;      // tokens per split (the last split takes the rest)
  size_t workspace_bytes = 0;
};

// n_splits = 0 picks the split count that fills the device once at max_len;
// a positive value forces it (tests). Throws tq::Error for an unsupported shape.
DenseDecodePlan dense_decode_plan(const DenseDecodeArgs& a, int n_splits = 0);
// Ordered on `stream`; throws tq::Error for arguments that do not match the plan.
void dense_decode_bf16(const DenseDecodeArgs& a, const DenseDecodePlan& plan, void* workspace,
                       size_t workspace_bytes, Stream stream = nullptr);

}  // namespace tq::cuda
