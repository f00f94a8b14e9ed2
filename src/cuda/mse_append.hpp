// Internal: the quantize-append kernel of the GPU KV layer (mse_append.cu) and
// what the host prepares for it. The CPU encoder (MseQuantizer::encode_one
// over kernels_ref.cpp) is its specification: codes and scales bit-identical.
//
// Work comes in tiles: tokens [token0, token0 + n) x heads [h0, h0 + nh) of
// the input, all in one page at consecutive slots, so that the records of one
// head form one contiguous byte run (written with 16-byte stores). The host
// cuts an append into tiles (append_tiles below); the kernel never needs the
// page table.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda/kernels.hpp"
#include "turboquant/cuda.hpp"

struct CUstream_st;

namespace tq::cuda {

// Status bit beside kStatusNonFinite / kStatusScaleOverflow (kernels.hpp):
// an input component beyond the f16 range (|x| > 65504) while the layer rounds
// its input to f16, which KvCache's f16 dense format refuses too.
constexpr int kStatusDenseOverflow = 4;
// A captured decode step (GpuKvLayer::append_step_device) that would take a
// sequence past the tokens reserve_steps reserved for it.
constexpr int kStatusReserve = 8;

// src/cuda/dense_rows.cu: n elements of src (dtype) rounded to f16 bits as
// src/util/half.cpp rounds them; ORs kStatusNonFinite / kStatusDenseOverflow
// (|x| > 65504) into *status (device).
void launch_to_f16_rows(const void* src, DType dtype, size_t n, uint16_t* dst, int* status,
                        CUstream_st* stream);

// One dense row move of a batched decode append (src/cuda/dense_rows.cu):
// row_bytes from src_k to dst_k and from src_v to dst_v (16-byte aligned;
// dst_k null: no copy).
struct DenseRowCopy {
  const uint8_t* src_k;
  const uint8_t* src_v;
  uint8_t* dst_k;
  uint8_t* dst_v;
};
// copies: device [n]; one block per copy. states (device [n, 4] = {seq,
// n_pre, win_start, win_count}) or null: also state[3 seq + j] = those.
// only_if_clean (device, or null): the copies and states are skipped when
// it, or *sticky (or null), is non-zero; a non-zero *only_if_clean is OR'd
// into *sticky (see launch_append_commit).
void launch_dense_row_copies(const DenseRowCopy* copies, int n, size_t row_bytes, const int* states,
                             int* state, const int* only_if_clean, int* sticky, CUstream_st* stream);

// The dense rows of a layer, as a captured step's kernels see them.
struct DenseStepRows {
  uint8_t* dense_k = nullptr;  // the layer's rows [max_seqs, prefix + window, n_heads, dim] f16
  uint8_t* dense_v = nullptr;
  int* state = nullptr;        // [max_seqs, 3] {n_pre, win_start, win_count}
  int prefix_slots = 0, window_slots = 0;
  int* active = nullptr;       // [n], written by the step
};

// The dense half of a captured decode step for the tile kernels (channel
// splits; tq-mse steps plan inside launch_mse_step), planned on the device
// from the states as
// they are at replay, as append_batch_dense plans it on the host. Row i of
// the batch (sequence seqs[i]; k, v: device [n, n_heads_kv, head_dim] of
// dtype) is rounded to f16 into new_k / new_v [n, row] (flags OR'd into
// *status, as launch_to_f16_rows); where the prefix and window are full, the
// row leaving them (the ring's oldest, or the new one without a window) goes
// to page_k / page_v row i and active[i] = 1 (else 0); copies[i] and
// states[4 i ..] (for launch_dense_row_copies, after the append's commit)
// put the new row into its slot and give the sequence's next state.
struct DenseStepPlan {
  const int* seqs = nullptr;
  int n = 0;
  const void* k = nullptr;
  const void* v = nullptr;
  DType dtype = DType::f32;
  size_t row_elems = 0;                  // n_heads_kv * head_dim
  DenseStepRows rows;
  uint8_t *new_k = nullptr, *new_v = nullptr, *page_k = nullptr, *page_v = nullptr;
  DenseRowCopy* copies = nullptr;
  int* states = nullptr;
  int* status = nullptr;
};
void launch_dense_step_plan(const DenseStepPlan& p, CUstream_st* stream);

// Elements of one vector per thread (the FWHT runs in registers), threads per
// vector and threads per block: 64 elements a thread, i.e. head_dim 64 one
// thread a vector, 128 two adjacent lanes, 256 four. (More elements a thread
// unroll to more hot code than the instruction caches hold: one thread per
// d-128 vector, ~66 KB, and two per d-256 vector stalled their warps on
// instruction fetch: docs/kernel-notes.md, append v3 and the twenty-third
// session.) head_dim 128 and 256 run 256-thread blocks, so that a tile holds
// 128 / 64 vectors (fewer tiles for the host to cut and upload).
constexpr int append_elems_per_thread(int dim) { return dim <= 64 ? dim : 64; }
constexpr int append_threads(int dim) { return dim == 64 ? 128 : 256; }
constexpr int append_rows_per_tile(int dim) {
  return append_threads(dim) / (dim / append_elems_per_thread(dim));
}

struct AppendTile {
  int32_t token0;      // first token (row of the input's token axis)
  int32_t page;        // physical page of all n tokens
  uint16_t slot0, n;   // slots slot0 .. slot0 + n - 1 of that page
  uint16_t h0, nh;     // heads h0 .. h0 + nh - 1; n * nh <= append_rows_per_tile(dim)
};
static_assert(sizeof(AppendTile) == 16, "AppendTile is uploaded as raw bytes");

// How the kernel finds a code (the host picks per format, append_format()):
//  - table1 / table2: the cell of v (v * 2^s rounded to an integer, clamped to
//    [-16, 15]: one of 32 lanes) gives, by two or three warp shuffles, the
//    number of boundaries in lower cells and the one or two boundaries in the
//    cell; code = base + (b0 < v) [+ (b1 < v)]. Exact for any v because the
//    cell map is monotone and the host computes each boundary's cell with the
//    same float operations (see mse_append.cu).
//  - binary: the CPU's binary search over the boundaries in shared memory
//    (widths whose boundaries do not fit 32 cells: 6 bits and more; table2
//    serves 5 bits).
enum class AppendSearch : int { table1 = 0, table2 = 1, binary = 2 };

// The table of a sorted boundary list (host side, exact: see AppendSearch):
// the largest cell width 2^-s that puts at most one boundary (5 bits: two)
// in each of the 32 cells; search binary where none does (6 bits and more).
struct SearchTable {
  AppendSearch search = AppendSearch::binary;
  float cell_scale = 1.0f;           // 2^s
  float b0[32], b1[32];              // per lane: the cell's boundaries, ascending (+inf: none)
  int32_t base[32];                  // per lane: boundaries in lower cells
};
SearchTable search_table(const std::vector<float>& boundaries, int bits);

// Everything the kernel needs of one format, passed by value as a kernel
// parameter (constant bank: the signs are read with compile-time offsets).
struct AppendFormat {
  MseDeviceFormat f;                 // dim, bits, boundaries (device), post_scale, bytes
  SearchTable tab;                   // search_table of the boundaries
  uint32_t sign_f32[256];            // per element: 0 or 0x80000000 (the rotation's signs)
  uint32_t sign_pair[128];           // per element pair 2p, 2p+1: bits 15 and 31
};

// The kernel's view of a format (its table: search_table).
AppendFormat append_format(const MseDeviceFormat& f, const std::vector<float>& signs,
                           const std::vector<float>& boundaries);

// The tiles of a captured decode step (GpuKvLayer::append_step_device),
// computed by the append kernels themselves from the device's lengths and
// page tables, so that no host data and no planning kernel precede them:
// tile k is input row i = k / tiles_per_seq (sequence seqs[i]), heads
// (k % tiles_per_seq) * heads_per_tile onward, one token at the sequence's
// length; n = 0 (nothing stored) where that length has reached limits[seq]
// (the pages past it may not be the sequence's).
// The step is committed by whichever block of the K and V kernels (they
// run at once) finishes last (append_step_block_done).
struct AppendStepTiles {
  const int* seqs = nullptr;  // device [n]; null: the tiles are AppendLaunch::tiles
  // device [n] or null (every row): row i stores, is checked against its
  // limit and counts only where active[i] != 0 (a layer with dense tokens:
  // the rows leaving the prefix / window for the pages this step).
  const int* active = nullptr;
  int n = 0, tiles_per_seq = 0, heads_per_tile = 0, n_heads = 0;
  int* lengths = nullptr;           // device [max_seqs]
  const int* limits = nullptr;      // device [max_seqs]
  const int* page_table = nullptr;  // device [max_seqs, max_pages_per_seq]
  int max_pages_per_seq = 0, page_tokens = 0;
  int* done = nullptr;    // device: tiles of this step finished (K and V), 0 between steps
  int* sticky = nullptr;  // device: the layer's error word
};

#ifdef __CUDACC__
__device__ __forceinline__ AppendTile append_tile_at(const AppendTile* tiles, const AppendStepTiles& s, int k) {
  if (s.seqs == nullptr) return tiles[k];
  const int i = k / s.tiles_per_seq, h0 = (k % s.tiles_per_seq) * s.heads_per_tile;
  const int seq = s.seqs[i], t = s.lengths[seq];
  AppendTile a;
  a.token0 = i;
  a.h0 = static_cast<uint16_t>(h0);
  a.nh = static_cast<uint16_t>(min(s.heads_per_tile, s.n_heads - h0));
  a.page = 0;
  a.slot0 = 0;
  a.n = 0;
  if (t < s.limits[seq] && (s.active == nullptr || s.active[i] != 0)) {
    a.page = s.page_table[size_t(seq) * s.max_pages_per_seq + t / s.page_tokens];
    a.slot0 = static_cast<uint16_t>(t % s.page_tokens);
    a.n = 1;
  }
  return a;
}

// Called by every block of a step's append kernels after its last tile
// (status: the step's status word, which the blocks OR their flags into;
// mine: the block's count of the step's work, total: the step's, e.g.
// tiles of the K and V kernels together). The block that completes total
// commits the step: the lengths of seqs grow by one only if the status and
// the error word are 0 and no sequence had reached its limit (then
// kStatusReserve); a refusal is OR'd into the error word. It leaves the
// status and the count 0 for the next step. (The words written by other
// blocks are read past L1: __ldcg.)
__device__ __forceinline__ void append_step_block_done(const AppendStepTiles& s, int mine, int total, int* status) {
  if (s.seqs == nullptr) return;
  __shared__ int step_last, step_st;
  __threadfence();  // each thread's flags in *status (and records) before the count
  __syncthreads();
  if (threadIdx.x == 0) step_last = atomicAdd(s.done, mine) + mine == total;
  __syncthreads();
  if (!step_last) return;
  __threadfence();
  if (threadIdx.x == 0) step_st = __ldcg(status) | __ldcg(s.sticky);
  __syncthreads();
  auto active = [&](int i) { return s.active == nullptr || s.active[i] != 0; };
  for (int i = threadIdx.x; i < s.n; i += blockDim.x)
    if (active(i) && __ldcg(s.lengths + s.seqs[i]) >= s.limits[s.seqs[i]]) atomicOr(&step_st, kStatusReserve);
  __syncthreads();
  const int refused = step_st;
  if (refused == 0) {
    for (int i = threadIdx.x; i < s.n; i += blockDim.x)
      if (active(i)) s.lengths[s.seqs[i]] += 1;
  } else if (threadIdx.x == 0) {
    atomicOr(s.sticky, refused);
  }
  if (threadIdx.x == 0) {
    *status = 0;
    *s.done = 0;
  }
}

// This block's tiles of a launch over n_tiles (blocks stride the tiles).
__device__ __forceinline__ int append_tiles_of_block(int n_tiles) {
  return (n_tiles - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x);
}
#endif

struct AppendLaunch {
  const void* x = nullptr;   // device [n_tokens, n_heads, dim] of dtype, 16-byte aligned
  DType dtype = DType::f32;
  DType round_to = DType::f16;  // each element rounded to this format first (f32: none)
  int n_heads = 0;
  const AppendTile* tiles = nullptr;  // device [n_tiles]
  AppendStepTiles step;               // or, with step.seqs set, n_tiles computed ones
  int n_tiles = 0;
  PagedRegion region;
  int* status = nullptr;     // device int, ORed with kStatus* bits
};

void launch_mse_append_tiles(const AppendLaunch& a, const AppendFormat& fmt, CUstream_st* stream);

// The append of a captured step (src/cuda/mse_step.cu): one launch, a warp
// per vector (a step's few vectors would leave the tile kernels' blocks
// mostly idle), the same records as the tile kernels. k, v: device [step.n,
// n_heads, dim] of dtype, each element first rounded to round_to; K's
// records into k_region, V's at v_region_offset of the same pool; flags into
// *status; the last block commits (append_step_block_done).
// dense (or null): a layer with dense tokens (DenseStepRows). Each warp then
// plans its row from the device's state of the sequence, as
// append_batch_dense plans on the host: the row that leaves the prefix /
// window (the ring's oldest, f16, or the new row without a window) is the
// one encoded, active[i] says whether row i has one, and the new rows'
// values are checked as launch_to_f16_rows checks them (flags into
// *status); launch_dense_step_finish then moves the new rows into their
// slots once the step is committed.
struct StepLaunch {
  AppendStepTiles step;
  const void *k = nullptr, *v = nullptr;
  DType dtype = DType::f32, round_to = DType::f16;
  int n_heads = 0;
  PagedRegion k_region;
  size_t v_region_offset = 0;
  int* status = nullptr;
  const DenseStepRows* dense = nullptr;
};
// tq-mse K and V: both formats must share head_dim and search mode
// (mse_step_supported).
bool mse_step_supported(const AppendFormat& kf, const AppendFormat& vf);
void launch_mse_step(const StepLaunch& a, const AppendFormat& kf, const AppendFormat& vf, CUstream_st* stream);
// After launch_mse_step with dense rows: unless the layer's error word
// (*sticky) holds a refusal, each sequence of the step's batch takes its new
// row (k, v: [n, n_heads, dim] of dtype, rounded to f16) into the slot
// append_batch_dense would give it, and its next state.
void launch_dense_step_finish(const AppendStepTiles& step, const void* k, const void* v, DType dtype,
                              int n_heads, int dim, const DenseStepRows& dense, CUstream_st* stream);

// The search tables of a split's two segments (search_table of each
// segment's boundaries; host side, built with the layer).
struct SplitSearch {
  SearchTable seg[2];
};

// The same for a channel-split format (src/cuda/split_append.cu): the tiles,
// input, rounding and status of `a`; records of record_bytes (both
// sub-records) in a.region, head_dim dim.
void launch_split_append_tiles(const AppendLaunch& a, const SplitFormat& f, const SplitSearch& search, int dim,
                               int record_bytes, CUstream_st* stream);
// The captured step's append (launch_mse_step) for K and V both split in two
// halves of dim / 2 channels (SplitFormat::halves): a warp per half,
// split_append.cu's arithmetic; all four halves must share a search mode
// (split_step_supported). record_bytes: K's and V's records.
bool split_step_supported(const SplitFormat& kf, const SplitFormat& vf, const SplitSearch& ks,
                          const SplitSearch& vs, int dim);
void launch_split_step(const StepLaunch& a, int dim, const SplitFormat& kf, const SplitFormat& vf,
                       const SplitSearch& ks, const SplitSearch& vs, int k_record_bytes, int v_record_bytes,
                       CUstream_st* stream);
// The captured step's append for outlier channels in K (a split whose first
// segment has <= 32 channels: turbo4-out, paper_mse-out) beside a tq-mse V
// of the same head_dim (outlier_step_supported): one launch, a warp per
// vector, K as split_append.cu's outlier_append_kernel encodes it.
bool outlier_step_supported(const SplitFormat& kf, const AppendFormat& vf, int dim);
void launch_outlier_step(const StepLaunch& a, int dim, const SplitFormat& kf, int k_record_bytes,
                         const AppendFormat& vf, CUstream_st* stream);

// Ordered after the append kernels of one append: writes the page-table
// entries (index, page) unconditionally (entries past a sequence's pages are
// never read) and the new lengths (seq, length) only when *status == 0, so a
// refused append leaves the device lengths as they were without a host sync
// in between.
// extra_status (or null) is OR'd into *status first: either non-zero keeps
// the lengths uncommitted. sticky (or null): the layer's error word of
// asynchronous appends; non-zero also refuses, and a refusal is OR'd into it,
// so that every later append is dropped until the host has seen it.
void launch_append_commit(const int* pt_updates, int n_pt, const int* len_updates, int n_len,
                          int* page_table, int* lengths, int* status, const int* extra_status,
                          int* sticky, CUstream_st* stream);


}  // namespace tq::cuda
