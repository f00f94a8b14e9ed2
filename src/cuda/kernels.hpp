// Internal: the CUDA kernels of the GPU KV layer, behind plain launch
// functions (raw pointers, strides, a params struct; nothing CUDA-specific in
// the signatures but the stream). The scalar CPU pipeline (src/quant/mse.cpp,
// src/kernels/kernels_ref.cpp) is their specification.
#pragma once

#include <cstddef>
#include <cstdint>

#include "turboquant/cuda.hpp"

// Functions of these structs that device code calls too.
#if defined(__CUDACC__)
#define TQ_HOST_DEVICE __host__ __device__
#else
#define TQ_HOST_DEVICE
#endif

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

// A channel-split tq-mse format (fractional b, or hi=N,hb=B outlier channels:
// quant::SplitQuantizer) on the device. Each record is two tq-mse records
// back to back, [hi sub-record][lo sub-record], each over its own channel
// subset with its own rotation, codebook and scale; the device keeps the
// CPU's bytes and layout. The rotation of a segment is Rotation's hadamard
// for its dim: signs1, then normalised Hadamard blocks (largest first); a
// dim that is not a power of two adds a second round: perm, signs2, blocks.
constexpr int kMaxRotationBlocks = 8;  // power-of-two blocks of a dim < 256
struct SegmentRotation {
  int dim = 0;
  const float* signs1 = nullptr;    // [dim], exactly +-1
  const int* perm = nullptr;        // [dim] (y[i] = x[perm[i]]); null: one round
  const float* signs2 = nullptr;    // [dim] (second round)
  int n_blocks = 0;
  int blocks[kMaxRotationBlocks] = {};
  float block_scale[kMaxRotationBlocks] = {};  // 1.0f / sqrtf(block), as Rotation::run
};
struct SplitSegment {
  int dim = 0, bits = 0;
  int offset = 0;      // byte offset of the sub-record in the record
  int code_bytes = 0;  // packed_bytes(dim, bits); the scale follows
  int scale_f32 = 0;
  const float* boundaries = nullptr;  // [2^bits - 1]
  const float* centroids = nullptr;   // [2^bits]
  SegmentRotation rot;
};
struct SplitFormat {
  int n_seg = 0;  // 0: not a channel split; else 2
  SplitSegment seg[2];  // the hi channels (the wider codes), then the rest
  // device [n_heads_kv, dim]: per KV head, seg[0]'s channels in their order,
  // then seg[1]'s (ascending): the channel whose value is element j of the
  // [seg 0 | seg 1] vector.
  const int* channels = nullptr;

  // Two halves of dim / 2 channels with one-block rotations (turbo2.5,
  // turbo3.5): the split that the fast paths take (the halves append, the
  // tensor-core kernel with more conditions: decode_shape, the merge's
  // inverse rotation).
  TQ_HOST_DEVICE bool halves(int dim) const {
    if (n_seg != 2) return false;
    for (const SplitSegment& g : seg)
      if (g.dim != dim / 2 || g.rot.perm != nullptr || g.rot.n_blocks != 1) return false;
    return true;
  }
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

// Quantize-append: src/cuda/mse_append.hpp (launch_mse_append_tiles).

// Which decode-attention kernel runs (launch_decode_attention):
//  - reference:   decode_attention.cu, CUDA cores, byte loads; every tq-mse
//                 format and shape of the GPU layer, channel splits
//                 included (the only kernel for most of those). The specification
//                 the fast kernel is tested against.
//  - tensor_core: decode_attention_tc.cu, codes staged in shared memory (sm_90:
//                 tensor / bulk copies; older GPUs: cp.async), decoded to
//                 fp16 through shared-memory tables, QK and PV on mma.sync.
//                 Supports K and V bits 3 or 4 with fp16 scales (3-bit K
//                 and V of one codebook; the channel splits of
//                 DecodeShape::split_halves and k_outlier), head_dim 64 /
//                 128 / 256, GQA group <= 8, page_tokens a multiple of 16, and
//                 a device with enough shared memory (decode_tc_unsupported).
//  - automatic:   tensor_core where it is supported, else reference. The
//                 fallback is deliberate and visible: decode_kernel_for says
//                 which one a shape gets, decode_tc_unsupported says why.
enum class DecodeKernel : int { automatic = 0, reference = 1, tensor_core = 2 };
const char* to_string(DecodeKernel k);

// Process-wide override for tests and benchmarks (default automatic): every
// later plan_decode_attention resolves to this kernel. Asking for tensor_core
// on a shape it does not support makes the plan throw tq::Error.
void set_decode_kernel_override(DecodeKernel k);
DecodeKernel decode_kernel_override();
// Test hook: tokens per split of the tensor-core kernel (0, the default: the
// planner's choice). Rounded up to the kernel's tile row and kept within what
// the workspace holds; small values put many items on every block.
void set_decode_tc_split_override(int split_tokens);
// Test hook: false makes the tensor-core kernel move its tile pairs by plain
// bulk copies on sm_90 too (default true: tensor copies wherever
// DecodeAttentionParams::pool_pages describes the pool). The two paths copy
// the same bytes to the same places, so outputs are bit-identical.
void set_decode_tc_tensor_copies(bool enabled);
// Test hook: false runs a one-split plan's merge kernel instead of the direct
// output (DecodeAttentionParams::direct; default true): the same outputs bit
// for bit. decode_tc_direct_launches counts the launches that wrote directly.
void set_decode_tc_direct_output(bool enabled);
long decode_tc_direct_launches();
// The shape facts that decide the kernel.
struct DecodeShape {
  int head_dim = 0;
  int k_bits = 0, v_bits = 0;
  bool k_scale_f32 = false, v_scale_f32 = false;
  int group = 0;        // n_heads_q / n_heads_kv
  int page_tokens = 0;
  bool k_split = false, v_split = false;  // channel-split formats
  // Both K and V split into two halves of head_dim / 2 channels at b and
  // b - 1 bits with one-round rotations and fp16 scales, one format for both
  // (turbo2.5, turbo3.5): the tensor-core kernel takes these, with k_bits =
  // v_bits = b (decode_shape fills it). Other splits: reference kernel.
  bool split_halves = false;
  // K split into its head_dim/8 outlier channels and the rest (hi= of the
  // -out presets: turbo4-out, paper_mse-out), fp16 scales, beside a plain V:
  // k_bits is then the lo segment's width and k_hi_bits the hi one's
  // (decode_shape fills them). The tensor-core kernel takes hb=6 at d 128 /
  // 256 with a 4-bit V.
  bool k_outlier = false;
  int k_hi_bits = 0;
  // K and V decode with the same centroids (DecodeAttentionParams::
  // kv_one_codebook): 3-bit K and V need it on the tensor-core kernel.
  bool kv_one_codebook = false;
};
// nullptr when the tensor-core kernel runs this shape on the current device;
// otherwise a sentence saying why not (then automatic means reference).
const char* decode_tc_unsupported(const DecodeShape& s);
// The kernel plan_decode_attention picks for a shape (the override applied).
DecodeKernel decode_kernel_for(const DecodeShape& s);

// The dense tokens kept outside the pages of a layer: the prefix (positions
// 0 .. n_pre - 1) and the window ring (positions n_pre + lengths[s] .. ,
// oldest first), both [max_seqs] x [prefix_slots + window_slots] x
// [n_heads_kv, dim] f16 (raw bits) in k / v, prefix slots first. state:
// device [max_seqs, 3] = {n_pre, win_start, win_count}. Their attention
// takes the causal window and softcap from DecodeAttentionParams and the
// sinks from here, in true positions. It is split over dense_splits
// blocks per (KV head, sequence) (= decode_dense_part_splits(dim,
// prefix_slots + window_slots)) and writes DecodeAttentionParams::dense_o
// [n_seqs, n_heads_q, dense_splits, dim] (normalised, original domain) and
// dense_lse [n_seqs, n_heads_q, dense_splits] (-inf: no visible dense
// token in that split).
struct DenseTokens {
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  const int* state = nullptr;
  int prefix_slots = 0, window_slots = 0;
  int sinks = 0;  // attention sinks in true positions
};

struct DecodeAttentionParams {
  // k / v: the formats; for a channel split (k_split.n_seg == 2) only
  // dim, record_bytes and scale_f32 of k / v are meaningful and the
  // segments say the rest.
  MseDeviceFormat k, v;
  SplitFormat k_split, v_split;
  const uint8_t* pool = nullptr;
  size_t page_bytes = 0;
  size_t v_region_offset = 0;
  // Pages the pool holds (its bytes / page_bytes); 0 = not given. The
  // tensor-core kernel describes the pool to the sm_90 copy engine as a
  // tensor of that many pages (one tensor copy per tile pair) when it is set.
  size_t pool_pages = 0;
  int page_tokens = 0;
  int n_heads_kv = 0;
  int group = 0;                // n_heads_q / n_heads_kv
  const int* page_table = nullptr;  // device [max_seqs, max_pages_per_seq]
  int max_pages_per_seq = 0;
  const int* lengths = nullptr;     // device [n_seqs]
  int n_seqs = 0;
  // 1: K and V have the same centroids (every segment of a split): the
  // tensor-core kernel's 3-bit tables hold one codebook for both. Set by
  // GpuKvLayer from the host formats.
  int kv_one_codebook = 0;
  int split_pages = 0;          // reference kernel: pages per split
  int n_splits = 0;             // splits per sequence (partial outputs per query head)
  float sm_scale = 0.0f;
  float softcap = 0.0f;
  int window = 0;
  int n_sinks = 0;
  // Dense tokens outside the pages (GpuKvLayerConfig::dense_window /
  // dense_prefix). The pages hold positions n_prefix .. n_prefix + len - 1
  // and window_tail dense tokens follow them, so the query sits at position
  // len - 1 + window_tail of the page index; n_sinks above is already
  // counted in page indices (n_sinks - n_prefix).
  int window_tail = 0;
  // The dense tokens and their attention's partials (workspace; see
  // DenseTokens), in the original (unrotated) domain: the merge adds them
  // after its inverse rotation. dense_o nullptr: no dense part.
  DenseTokens dense;
  float* dense_o = nullptr;
  float* dense_lse = nullptr;
  int dense_splits = 0;
  // Set by plan_decode_attention:
  DecodeKernel kernel = DecodeKernel::automatic;
  int split_tokens = 0;         // tokens per split (tensor_core; reference: split_pages * page_tokens)
  // Set by the tensor-core launch: 1 where one split covers each sequence's
  // window, V is one rotation and there are no dense tokens -- the kernel
  // then writes out / lse itself (the inverse rotation of its one partial,
  // what the merge would write bit for bit) and no merge kernel runs.
  int direct = 0;
  void* direct_out = nullptr;   // out of launch_decode_attention (out_dtype)
  float* direct_lse = nullptr;  // lse of launch_decode_attention (may be null)
  // Device plan (SplitPlanning; tensor-core kernel only): non-null, the
  // kernel plans its splits from the device's lengths and stores
  // {splits per sequence, tokens per split} here (workspace) for the merge
  // and for tests; split_tokens is then the shortest split it may choose and
  // n_splits the most splits it may choose (the partials' stride).
  int* device_plan = nullptr;
  // Element types (DType) of the query q and of out. The merge (or a direct
  // output) writes out in its type (io_dtype.cuh); a 16-bit q is converted
  // to f32 into q_f32 ([n_seqs, n_heads_q, dim], workspace) by one small
  // kernel first (reading it in the decode kernels themselves measured 1-3 %
  // slower at f32: their register allocation moved). Partials, lse: f32.
  int q_dtype = int(DType::f32);
  int out_dtype = int(DType::f32);
  float* q_f32 = nullptr;
};
// GpuKvLayer::attend keeps the device plan's words in the last
// kDevicePlanBytes of its workspace (workspace_bytes(n_heads_q) - this).
constexpr size_t kDevicePlanBytes = 16;

DecodeShape decode_shape(const DecodeAttentionParams& p);

// The most tokens the splits of one sequence cover, whatever its length: its
// capacity, or with a window and no sinks the window plus the 31 tokens
// decode_split_start rounds down by (fewer where the dense tail holds part
// of the window). n_splits is planned from this, so a captured plan stays
// correct as the sequences grow.
inline long decode_split_span_cap(const DecodeAttentionParams& p) {
  const long cap = long(p.max_pages_per_seq) * p.page_tokens;
  if (p.window <= 0 || p.n_sinks > 0) return cap;
  const long span = long(p.window) - p.window_tail + 31;
  return span < 1 ? 1 : span < cap ? span : cap;
}

// The first page index the tensor-core kernel's splits start from for a
// sequence of len paged tokens: with a sliding window and no sinks, the
// window's first visible token rounded down to a tile pair (32 tokens, so
// pairs keep their page alignment); else 0. Splits then cover only
// [start, len), so a windowed layer's work and partials scale with the
// window, not the context. Host (planning) and device (items) share it.
TQ_HOST_DEVICE inline int decode_split_start(int len, int window, int window_tail, int n_sinks) {
  if (window <= 0 || n_sinks > 0) return 0;
  const int win_lo = len + window_tail - window;  // the first visible page index
  return win_lo > 0 ? (win_lo & ~31) : 0;
}

// Most splits per sequence any kernel may plan for p's shape and capacity
// (max_pages_per_seq): the workspace holds [max_seqs, n_heads_q, this] partials.
int decode_max_splits(const DecodeAttentionParams& p);
// Resolves p.kernel (override, support) and picks p.split_tokens / p.n_splits.
// host_lengths: [p.n_seqs], the current lengths, used only to balance the
// splits over the SMs; the grid still covers max_pages_per_seq, so a run
// captured in a CUDA graph stays correct after the sequences grow.
void plan_decode_attention(DecodeAttentionParams& p, const int* host_lengths);

// q: [n_seqs, n_heads_q, dim] of p.q_dtype; partial_o: [n_seqs, n_heads_q,
// n_splits, dim] and partial_lse: [n_seqs, n_heads_q, n_splits] (workspace);
// out: [n_seqs, n_heads_q, dim] of p.out_dtype, lse: [n_seqs, n_heads_q] or
// null. Runs p.kernel (planned).
void launch_decode_attention(const DecodeAttentionParams& p, const void* q, float* partial_o,
                             float* partial_lse, void* out, float* lse, CUstream_st* stream);
// The two kernels behind it (p planned for that kernel), and the merge of
// the splits (+ inverse V rotation) that both end with.
// (q in f32: launch_decode_attention converted a 16-bit one.)
void launch_decode_attention_ref(const DecodeAttentionParams& p, const float* q, float* partial_o,
                                 float* partial_lse, void* out, float* lse, CUstream_st* stream);
void launch_decode_attention_tc(const DecodeAttentionParams& p, const float* q, float* partial_o,
                                float* partial_lse, void* out, float* lse, CUstream_st* stream);
// overlap: launch as a programmatic dependent (sm_90) of the kernel before it
// on the stream, which must trigger it (griddepcontrol.launch_dependents);
// the merge then waits for that kernel's writes on the device instead of
// paying a launch gap.
void launch_decode_merge(const DecodeAttentionParams& p, const float* partial_o,
                         const float* partial_lse, void* out, float* lse, CUstream_st* stream,
                         bool overlap = false);

// The dense tokens' attention (launched by launch_decode_attention when
// p.dense_o is set; see DenseTokens). overlap: launch as a programmatic
// dependent (sm_90) of the page kernel before it, which must trigger it:
// the dense part then runs on the SMs the page kernel leaves idle, and the
// kernel waits for the page kernel at its end, so that the merge (its own
// dependent) sees both.
void launch_decode_dense_part(const DecodeAttentionParams& p, const float* q, CUstream_st* stream,
                              bool overlap);
// Dense-part splits for head_dim and prefix + window slots (0: none).
int decode_dense_part_splits(int head_dim, int dense_slots);

// ---- The split cost model (host plan, and the device plan of captured runs) --
// Candidate split lengths, in block rows of tiles (decode_tc_tile_tokens):
// s_min, then every row count above it with at most 5 significant bits
// (1..32, 34, 36, .., 64, 68, ..), i.e. 1/32 to 1/16 apart; the j-th is
// found without walking the list, so the device evaluates them in parallel.
TQ_HOST_DEVICE inline int decode_split_rows(int j) {
  return j < 15 ? j + 1 : (16 + (j - 15) % 16) << ((j - 15) / 16);
}
// The index of the first decode_split_rows value above r (r >= 1).
TQ_HOST_DEVICE inline int decode_split_rows_after(int r) {
  if (r < 16) return r;
  int e = 0;
  while ((r >> e) >= 32) ++e;
  return 15 + 16 * e + (r >> e) - 16 + 1;
}
// The candidates for splits of at least rows_min rows over sequences whose
// longest span is l_max tokens: rows_min, then decode_split_rows(j) for j
// from decode_split_rows_after(rows_min) while at most the rows of l_max.
// (int: spans and splits are token counts of one sequence.)
TQ_HOST_DEVICE inline int decode_split_candidates(int rows_min, int l_max, int unit) {
  const int rows_max = l_max > 0 ? (l_max - 1) / unit + 1 : 0;
  return rows_max <= rows_min ? 1 : 1 + decode_split_rows_after(rows_max) - decode_split_rows_after(rows_min);
}
TQ_HOST_DEVICE inline int decode_split_candidate(int i, int rows_min) {
  return i == 0 ? rows_min : decode_split_rows(decode_split_rows_after(rows_min) + i - 1);
}
// What a plan costs: rounds of items over the resident blocks, each round as
// long as a split plus one row (a block's fixed cost per item). The plan is
// the candidate of least cost, the longer split on a tie (fewer partials).
TQ_HOST_DEVICE inline long long decode_split_cost(long items, int slots, long split_tokens, long unit) {
  return (long long)((items + slots - 1) / slots) * (long long)(split_tokens + unit);
}

// Tensor-core kernel internals the planner needs (decode_attention_tc.cu).
int decode_tc_tile_tokens(int head_dim);   // tokens per block row of tiles (one 32-token tile pair per warp)
int decode_tc_max_splits(const DecodeAttentionParams& p);
int decode_tc_split_tokens(const DecodeAttentionParams& p, const int* host_lengths);
// The shortest split a device plan of p may choose, or 0 where the host must
// plan (a split pinned by set_decode_tc_split_override).
int decode_tc_device_plan_min_split(const DecodeAttentionParams& p);

}  // namespace tq::cuda
