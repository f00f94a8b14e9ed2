// Internal: the CUDA kernels of the GPU KV layer, behind plain launch
// functions (raw pointers, strides, a params struct; nothing CUDA-specific in
// the signatures but the stream). The scalar CPU pipeline (src/quant/mse.cpp,
// src/kernels/kernels_ref.cpp) is their specification.
#pragma once

#include <cstddef>
#include <cstdint>

struct CUstream_st;

namespace tq::cuda {

// Status bits that the append kernel ORs into a device word; the host turns
// them into tq::Error (the CPU quantizer throws for the same inputs).
constexpr int kStatusNonFinite = 1;       // a NaN/Inf component, or |x|^2 overflows
constexpr int kStatusScaleOverflow = 2;   // scale > 65504 with an fp16 scale

// One tq-mse format on the device (rotation: signs then a normalised FWHT).
struct MseDeviceFormat {
  int dim = 0;                       // 64, 128 or 256
  int bits = 0;                      // 1..8
  const float* signs = nullptr;      // [dim], exactly +-1
  const float* boundaries = nullptr; // [2^bits - 1] ascending
  const float* centroids = nullptr;  // [2^bits]
  float post_scale = 0.0f;           // 1.0f / sqrtf(dim), computed as the CPU does
  int code_bytes = 0;                // packed_bytes(dim, bits); the scale follows
  int scale_f32 = 0;                 // 0: fp16 scale, 1: f32
  int record_bytes = 0;
};

// Where a page pool's records live: record (head h, token in page slot s) of
// the region starting region_offset bytes into page p is at
// pool + p * page_bytes + region_offset + (h * page_tokens + s) * record_bytes.
struct PagedRegion {
  uint8_t* pool = nullptr;
  size_t page_bytes = 0;
  size_t region_offset = 0;
  int page_tokens = 0;
  int n_heads = 0;
};

// Quantize-append: x [n_tokens, n_heads, dim] -> one record per (token, head)
// at page dst[2t], slot dst[2t + 1]. dst: device [n_tokens, 2]; status: device int.
void launch_mse_append(const float* x, int n_tokens, const int* dst, const MseDeviceFormat& f,
                       const PagedRegion& r, int* status, CUstream_st* stream);

struct DecodeAttentionParams {
  MseDeviceFormat k, v;
  const uint8_t* pool = nullptr;
  size_t page_bytes = 0;
  size_t v_region_offset = 0;
  int page_tokens = 0;
  int n_heads_kv = 0;
  int group = 0;                // n_heads_q / n_heads_kv
  const int* page_table = nullptr;  // device [max_seqs, max_pages_per_seq]
  int max_pages_per_seq = 0;
  const int* lengths = nullptr;     // device [n_seqs]
  int n_seqs = 0;
  int split_pages = 0;
  int n_splits = 0;             // max splits per sequence (the grid's x)
  float sm_scale = 0.0f;
  float softcap = 0.0f;
  int window = 0;
  int n_sinks = 0;
};

// q: [n_seqs, n_heads_q, dim]; partial_o: [n_seqs, n_heads_q, n_splits, dim]
// and partial_lse: [n_seqs, n_heads_q, n_splits] (workspace); out: [n_seqs,
// n_heads_q, dim], lse: [n_seqs, n_heads_q] or null.
void launch_decode_attention(const DecodeAttentionParams& p, const float* q, float* partial_o,
                             float* partial_lse, float* out, float* lse, CUstream_st* stream);

}  // namespace tq::cuda
