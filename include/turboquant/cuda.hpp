// The GPU side of the KV cache: one layer's pages in device memory, in the
// SAME record and page format as the CPU cache (format.hpp, kv_cache.hpp),
// written by a quantize-append kernel whose codes are bit-identical to the
// CPU quantizer, and read by a split-KV decode attention kernel that scores
// straight from the codes.
//
// Formats on the GPU (this step): tq-mse with an integer bit width 1..8,
// scale=norm, sf=f16|f32, rot=hadamard, head_dim 64, 128 or 256.
//
// The API is always present; in a build without CUDA cuda_available() is
// false and everything else throws tq::Error.
//
//   auto kq = tq::make_quantizer("tq-mse:b=4", 128, 1), vq = ...;
//   tq::cuda::GpuKvLayerConfig cfg;  cfg.n_heads_kv = 8; cfg.max_seqs = 4;
//   tq::cuda::GpuKvLayer layer(*kq, *vq, cfg);
//   int s = layer.add_sequence();
//   layer.append(s, k, v, n_tokens);               // host [n_tokens, n_heads_kv, 128]
//   tq::cuda::DeviceBuffer ws(layer.workspace_bytes(32));   // plan: once
//   layer.attend(q_dev, 32, {}, out_dev, nullptr, ws.data(), ws.size());  // run: no allocation
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
  int n_tokens(int seq) const;
  int n_pages(int seq) const;

  // Quantize-append of tokens at positions n_tokens(seq) ... Records are
  // kq/vq.encode_one of the input as given; KvCache::append first rounds each
  // token to its dense format (f16 by default), so for the same bytes as a
  // KvCache pass f16-representable input (a GPU-side rounding step is to do).
  // Throws tq::Error
  // (the sequence unchanged) on a NaN/Inf component, an fp16 scale overflow
  // or a full sequence / page pool. Synchronous (it checks the device status).
  // k, v: [n_tokens, n_heads_kv, head_dim], host memory
  void append(int seq, const float* k, const float* v, int n_tokens);
  // The same from device memory, ordered on `stream`.
  void append_device(int seq, const float* k, const float* v, int n_tokens,
                     Stream stream = nullptr);
  // One decode token for each of n sequences seqs[0..n-1] (distinct).
  // k, v: device [n, n_heads_kv, head_dim]
  void append_batch_device(const int* seqs, int n, const float* k, const float* v,
                           Stream stream = nullptr);

  // The bytes of page `page` of a sequence (to compare with, or load into, a
  // CPU cache). out: [page_bytes()] host memory; slots past n_tokens are unspecified.
  void download_page(int seq, int page, uint8_t* out) const;

  // ---- Decode attention: plan / run ---------------------------------------
  // Workspace of attend() for n_heads_q query heads (a multiple of n_heads_kv).
  size_t workspace_bytes(int n_heads_q) const;
  // One query token per sequence 0..n_seqs()-1, at its last position (causal,
  // window, sinks and softcap from params). Never allocates; ordered on
  // `stream`. q, out: device [n_seqs(), n_heads_q, head_dim]; lse: device
  // [n_seqs(), n_heads_q] or nullptr. A sequence with no visible key gives
  // out = 0, lse = -inf.
  void attend(const float* q, int n_heads_q, const AttentionParams& params, float* out,
              float* lse, void* workspace, size_t workspace_bytes, Stream stream = nullptr) const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace tq::cuda
