// Split-KV decode attention over tq-mse pages on tensor cores (mma.sync
// m16n8k16, fp16 in, fp32 accumulate; sm_80+, tuned for the H200). The
// reference is decode_attention.cu (same inputs, same partial outputs, same
// merge); docs/kernel-notes.md "GPU decode attention (H200)" has the design
// notes and the numbers.
//
// Shape of the work
//  - Persistent blocks, one per SM (the tables and stages fill its shared
//    memory). Work items are (split, sequence, KV head), split-major, taken
//    round robin; a split is split_tokens tokens (planned on the host so the
//    items fill the SMs evenly) and yields one partial (o, lse) per query head.
//  - Inside an item every warp takes pairs of adjacent 16-token tiles (pair
//    k = tiles 2k, 2k + 1; k = warp, warp + W, ...) and runs its own copy
//    pipeline over them (sm_90: one lane issues tensor copies -- one a pair
//    where K and V records have one size, else one each -- or, where the
//    pool is not described as a tensor or a pair spans two pages, bulk
//    copies, on per-stage mbarriers; older GPUs: cp.async; two stages of
//    one pair each, crossing into the block's next item), its own online
//    softmax and its own accumulators: no block barrier in the token loop.
//    At the end of an item the W warp states are merged exactly in shared
//    memory (2 barriers a round of up to 8 heads, each warp's share in its
//    free pipeline stage).
//  - A tile is one contiguous run of 16 K records and one of 16 V records of
//    one head in one page (page_tokens % 16 == 0), copied verbatim; a pair is
//    one run of 32 of each (two runs where a page size that is an odd
//    multiple of 16 puts the second tile on the next page).
//
// Decoding codes to fp16: a table of half2 per code PAIR in shared memory
// (256 entries for 4-bit codes, 64 for 3-bit), 32 copies side by side so that
// lane l always reads bank l (no conflicts whatever the codes), K and V
// copies interleaved: entry e of lane l is at byte e * 256 + side * 128 + 4 l.
// For 4-bit codes one PRMT builds that address from a code byte, so a lookup
// (two codes) costs PRMT + LDS. 3-bit K and V of one codebook (turbo3) use
// two 256-entry byte tables in the two sides instead (bt_addr), so that a
// 3-bit lookup is one PRMT too.
//
// QK: S^T (16 tokens x 8 heads) = K (A, 16 tokens x 16 dims, straight from
// table lookups: an A register holds two adjacent dims of one token, i.e. one
// code pair) x Q^T (B: the g rotated queries in fp16, zero columns up to 8).
// Lane (n, c) decodes rows n and n + 8 from its contiguous code segment of
// each token (dims c*D/4 ... (c+1)*D/4 - 1), so the k index is a permutation
// of the dims, the same one for Q and K.
// PV: O^T (16 dims x 8 heads) += V^T (A, 16 dims x 16 tokens) x P^T (B). Two
// movmatrix.trans turn the fp16 weights from the S^T accumulator layout into
// the P^T fragment. An A register holds one dim of TWO tokens: the pair index
// is built from two tokens' codes with LOP3s (4-bit nibbles / 3-bit groups),
// the same table serves. Token order inside a tile is permuted (k slot
// 2c + e + 8f <-> token c + 4e + 8f, S^T row r <-> the same token) so that
// the code loads of a warp hit 32 different banks for 66-byte records.
//
// Channel splits in two halves (turbo2.5, turbo3.5; SPLIT): each half has its
// own table (the lo half's at kLoTable), code segment and scale; k steps and m
// tiles are ordered so that each covers one half (scores s_hi S_hi + s_lo
// S_lo, two P^T fragments for the halves' V scales), the query is gathered by
// the head's channels and rotated per half, and the partials are in the
// reference kernel's [hi | lo] rotated layout, so the merge is the same.
//
// Outlier channels in K (turbo4-out, paper_mse-out; HB > 0): K records are
// [hi: D/8 channels at HB bits][lo: 7D/8 channels at KB bits], each with its
// own rotation and scale, V plain. The first k steps take the hi segment's
// codes one at a time (a 2^HB-entry table whose entries also hold the
// centroid's fp16 residual; the hi query in two fp16 terms: three mma a
// step), the rest the lo segment's pairs; the warps of the GQA group rotate
// their queries per segment themselves (warp_rotate_regs: any
// SegmentRotation, two rounds with a permutation included).
//
// Numerics: fp32 scores, softmax and accumulators; fp16 queries (scaled by
// their max |q| per head first), centroids and weights. The V scale s_v is
// folded into the fp16 weight w = 2^(x - M) * s_v with M a reference within
// kLazy of the running max of x + log2 s_v (not of x), so w <= 2^kLazy keeps
// full fp16 precision whatever the norms; the normaliser l = sum 2^(x - M)
// stays fp32. Values accumulate in
// the V rotation's domain; the merge applies one inverse rotation per output.
#include <cuda.h>  // CUtensorMap (the type only; the encoder comes through the runtime)
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>

#include "cuda/bulk_copy.cuh"
#include "cuda/cuda_check.hpp"
#include "cuda/fwht_registers.cuh"
#include "cuda/io_dtype.cuh"
#include "cuda/kernels.hpp"
#include "cuda/launch.cuh"
#include "cuda/split_rotation.cuh"

namespace tq::cuda {
namespace {

constexpr int kTileTok = 16;       // tokens per warp tile (one PV k step)
constexpr int kPairTok = 2 * kTileTok;  // tokens per copy: a warp's two adjacent tiles
static_assert(kPairTok == 32, "decode_split_start rounds to 32-token pairs");
constexpr int kMaxGroup = 8;       // query heads per KV head (the mma's N)
constexpr int kSmemLimit = 227 * 1024;  // opt-in shared memory per block on sm_90
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;
constexpr float kLazy = 8.0f;  // log2 of the largest fp16 softmax weight (see the token loop)

constexpr int warps_for(int d) { return d >= 256 ? 8 : 16; }  // d 256: ~170 registers a thread

// SPLIT: K and V records are channel splits of two halves (turbo2.5,
// turbo3.5): [hi: D/2 codes at KB bits, fp16 scale][lo: D/2 codes at KB - 1
// bits, fp16 scale], KB == VB, each half with its own one-block rotation.
// HB > 0 (OUT): K records are an outlier split (turbo4-out, paper_mse-out):
// [hi: D/8 channels at HB bits, fp16 scale][lo: 7D/8 channels at KB bits,
// fp16 scale], each segment with its own rotation (any SegmentRotation: the
// kernel rotates each query per segment, warp_rotate_regs); V is plain
// tq-mse at VB bits.
template <int D, int KB, int VB, bool SPLIT = false, int HB = 0>
struct Cfg {
  static_assert(!SPLIT || KB == VB, "split records: K and V of one format");
  static_assert(HB == 0 || (!SPLIT && D % 128 == 0), "outlier K: hi channels D/8, a multiple of 16");
  static constexpr bool kOut = HB > 0;
  static constexpr int kWarps = warps_for(D);
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLB = SPLIT ? KB - 1 : 0;  // the lo half's bits
  static constexpr int kHiCode = SPLIT ? D / 2 * KB / 8 : 0, kLoCode = SPLIT ? D / 2 * kLB / 8 : 0;
  static constexpr int kLoOff = kHiCode + 2;  // split: the lo half's codes in a record
  // Outlier K: the hi segment's dims, k steps and code bytes; the lo one's.
  static constexpr int kOHiDims = kOut ? D / 8 : 0, kOLoDims = D - kOHiDims;
  static constexpr int kOHiSteps = kOHiDims / 16, kOLoSteps = kOLoDims / 16;
  static constexpr int kOHiCode = kOHiDims * HB / 8, kOLoCode = kOLoDims * KB / 8;
  // Code words of a lane's part of each segment (QK: a quarter of its dims; +1 for the funnel shift).
  static constexpr int kOHiW = (kOHiDims / 4 * HB + 31) / 32, kOLoW = (kOLoDims / 4 * KB + 31) / 32;
  static_assert(kOHiSteps + kOLoSteps + kOHiW + kOLoW >= 0);  // (used by the outlier kernels only)
  // code bytes (not split: the fp16 scale follows; split: the hi scale follows)
  static constexpr int kKCode = SPLIT ? kHiCode : kOut ? kOHiCode : D * KB / 8, kVCode = SPLIT ? kHiCode : D * VB / 8;
  static constexpr int kKRec = SPLIT ? kHiCode + kLoCode + 4 : kOut ? kOHiCode + kOLoCode + 4 : kKCode + 2;
  static constexpr int kVRec = SPLIT ? kKRec : kVCode + 2;
  static constexpr int kKSeg = D * KB / 32;  // QK: code bytes of one lane (D/4 dims of a token)
  static constexpr int kKSegW = (kKSeg + 3) / 4;
  static constexpr int kVSeg = D * VB / 64;  // PV: code bytes of one lane (D/8 dims of a token)
  static constexpr int kVSegW = (kVSeg + 3) / 4;
  // Split: code bits of a lane's part of one half (QK: D/8 dims, PV: D/16),
  // in words (+1 for the funnel shift of an unaligned start).
  static constexpr int kKHiW = (D / 8 * KB + 31) / 32, kKLoW = (D / 8 * kLB + 31) / 32;
  static constexpr int kVHiW = (D / 16 * KB + 31) / 32, kVLoW = (D / 16 * kLB + 31) / 32;
  static_assert(kKHiW + kKLoW + kVHiW + kVLoW + kKSegW + kVSegW >= 0);  // (each used by some kernels only)
  // Split: the lo half's table follows the hi half's (a power-of-two offset
  // above the entry bits, so a lane's base ORs in).
  // Byte tables (bt_addr; K and V of one codebook share them): 256 entries
  // in two sides. 3-bit K and V (turbo3): side 0 table A, side 1 table B.
  // A split of 3- and 2-bit halves (turbo2.5): those for the hi half, and
  // 64 KB on the lo half's nibble tables (side 0 low nibble, side 1 high).
  static constexpr bool kByte3 = KB == 3 && VB == 3;
  static constexpr int kLoTable = SPLIT ? (kByte3 ? 65536 : 256 << (2 * KB)) : 0;
  // Streams of a 3-bit K segment (bt_addr): 2 with tables A and B, 4 with
  // A only (K side, beside a 4-bit V table); 0: not byte tables. The lo
  // half of a byte-table split reads one stream.
  static constexpr int kKStreams = kByte3 ? 2 : !SPLIT && !kOut && KB == 3 ? 4 : 0;
  static constexpr int kLoStreams = SPLIT && kByte3 ? 1 : 0;
  static_assert(kKStreams + kLoStreams >= 0);  // (each used by some kernels only)
  static constexpr int kPairTables = SPLIT    ? kLoTable + (kByte3 ? 65536 : 256 << (2 * kLB))
                                     : kByte3 ? 65536
                                              : 256 << (2 * (KB > VB ? KB : VB));
  // Outlier K: the hi segment's codes one at a time, from a table of 2^HB
  // entries after the pair tables (32 lane copies of a 4-byte word holding
  // the fp16 centroid twice: entry e of lane l at kHiTable + e * 128 + 4 l).
  static constexpr int kHiTable = kPairTables;
  static constexpr int kTableBytes = kPairTables + (kOut ? (128 << HB) : 0);
  // sm_90 tensor copies (pool_tensor_maps): with K and V records of one
  // size one copy moves a pair's K and V runs back to back; otherwise K and V
  // are two copies and the V run starts 128-byte aligned (a tensor copy's
  // destination).
  static constexpr bool kOneCopy = kKRec == kVRec;
  static constexpr int kVOff = kOneCopy ? kPairTok * kKRec : (kPairTok * kKRec + 127) / 128 * 128;
  // One stage holds a pair of tiles: 32 K records, then 32 V records at
  // kVOff (each tile's run a multiple of 16 bytes), then 16 bytes of slack
  // for the aligned over-read of the last code segment; stages are 128-byte
  // multiples.
  static constexpr int kStageBytes = (kVOff + kPairTok * kVRec + 16 + 127) / 128 * 128;
  // sQ [8][D] fp16; outlier K: then the hi segment's fp16 residuals [8][D/8],
  // the query rotation's scratch (a warp's [D] floats, for 8 warps), its
  // signs1 / signs2 / perm over [hi | lo] ([D] each) and the segments'
  // blocks: RotMeta.
  static constexpr int kRotBytes = kOut ? (kMaxGroup + 3) * D * 4 + 2 * 18 * 4 : 0;
  static constexpr int kQBytes = kMaxGroup * D * 2 + (kOut ? kMaxGroup * kOHiDims * 2 : 0) + kRotBytes;
  // sM, sL, sF: [kWarps][8]; sQs, sInvL: [8]; sScr: [kWarps] (byte offsets)
  static constexpr int kSmallBytes = 4 * (3 * kWarps * kMaxGroup + 2 * kMaxGroup + kWarps);
  static constexpr int kBarBytes = 8 * kWarps * 2;  // one mbarrier per warp and stage (2)
  // Heads merged per round at the end of an item: each warp's [heads][D]
  // fp32 share goes to its free pipeline stage, so a round takes as many
  // heads as a stage holds (8 or 4: every GQA group of Llama and Gemma in
  // one round).
  static constexpr int kStageHeads = kStageBytes / (D * 4);
  static constexpr int kCombineHeads = kStageHeads >= 8 ? 8 : kStageHeads >= 4 ? 4 : 2;
  static_assert(kStageHeads >= 2, "a stage must hold two heads of the combine");
  static constexpr int kStages = 2;
  static constexpr int kStageOff = kTableBytes;  // the table at 0: LDS [reg + base]
  static constexpr int kQOff = kStageOff + kWarps * kStages * kStageBytes;
  static constexpr int kSmallOff = kQOff + kQBytes;
  static constexpr int kBarOff = kSmallOff + kSmallBytes;  // [kWarps][kStages] mbarriers
  // Device plan (kTcDevicePlan): {tokens per split, items}, read back where
  // used so that neither holds a register through the tile loop.
  static constexpr int kPlanOff = kBarOff + kBarBytes;
  static constexpr int kSmemBytes = kPlanOff + 16;
  static_assert(kBarOff % 8 == 0);
  static_assert(kTileTok * kKRec % 16 == 0 && kTileTok * kVRec % 16 == 0 && kStageBytes % 16 == 0,
                "bulk copies need 16-byte runs");
  static_assert(kSmemBytes <= kSmemLimit, "shared memory too small for two stages");
};

// ---- small PTX helpers ---------------------------------------------------------
// Each copy path is defined only where it is used (sm_90 machine code: bulk
// copies; the compute_80 PTX and the host pass: cp.async), so that neither
// pass warns about unused functions.
#if !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
__device__ __forceinline__ void cp_async16(uint32_t sdst, const void* gsrc) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sdst), "l"(gsrc) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#else
// sm_90 bulk copies (bulk_copy.cuh): per tile 1 expect_tx + 2 copies instead
// of 6 cp.async of 16 bytes per lane plus their address arithmetic.
using bulk::copy_g2s;
using bulk::fence_mbar_init;
using bulk::mbar_expect_tx;
using bulk::mbar_init;
using bulk::mbar_wait;
using bulk::tensor_g2s_4d;
#endif

// d += A * B, m16n8k16, row.col, f16 x f16 -> f32.
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// {lo, hi} -> one register of two fp16 (lo in the low half: the lower k index).
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// Transpose of an 8x8 fp16 matrix held as mma fragments (lane: row lane/4,
// columns 2(lane%4), +1) into the same fragment layout.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t r;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; -inf -> 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rcp(float x) {  // 1/inf = 0
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Side 1 of a table entry (V's table beside K's; byte tables: B beside A)
// is 128 bytes above side 0. Lookups reach it through a base register of
// its own (lb1) or, where IMM (the split kernels), through the LDS's
// immediate offset from the side-0 base, one register fewer: Llama turbo2.5
// -1.6 to -1.9 %; in the other kernels the same change (ptxas then
// allocated registers differently) measured turbo3 +0.8 to +1.9 %, turbo4
// and paper_mse +-1 % (docs/kernel-notes.md, nineteenth session).
constexpr uint32_t kSide1 = 128;

__device__ __forceinline__ uint32_t lds32(const uint8_t* smem, uint32_t off) {
  return *reinterpret_cast<const uint32_t*>(smem + off);
}
__device__ __forceinline__ float lds_half(const uint8_t* smem, uint32_t off) {
  return __half2float(*reinterpret_cast<const __half*>(smem + off));
}

// NW words of codes starting at byte offset base + sh / 8 (base 4-byte
// aligned, sh in {0, 8, 16, 24}): aligned loads and a funnel shift. Reads up
// to 4 bytes past the segment. Records have an even size and stages start
// 16-byte aligned, so a lane's segments of one tile (tokens 4 or 8 apart)
// share one shift: the caller computes it once per lane.
template <int NW>
__device__ __forceinline__ void load_seg(const uint8_t* smem, uint32_t base, uint32_t sh, uint32_t (&w)[NW]) {
  uint32_t raw[NW + 1];
#pragma unroll
  for (int i = 0; i <= NW; ++i) raw[i] = lds32(smem, base + 4u * i);
#pragma unroll
  for (int i = 0; i < NW; ++i) w[i] = __funnelshift_r(raw[i], raw[i + 1], sh);
}

// Byte tables for 3-bit codes. A code byte holds a whole 6-bit code pair,
// plus bits of its neighbours, if the code stream is read at bit offsets
// 0 and 4 (a pair at bit b with b % 8 = 0 or 2 is in byte b / 8 of the
// stream, in its low or high 6 bits; b % 8 = 4 or 6: of the stream shifted
// right by 4), or in the low 6 bits of a byte if it is read at offsets 0, 2,
// 4 and 6. Tables indexed by the whole byte ignore the neighbours' bits:
// A[e] = pair(e & 63), B[e] = pair(e >> 2). So a lookup is one PRMT, as for
// 4-bit codes, instead of a shift and a mask, for one funnel shift a word
// and stream. NSTR = 2: tables A and B (Cfg::kByte3: K and V share them);
// NSTR = 4: table A only (3-bit K beside a 4-bit V table: no room for B).
template <int NSTR, int NW>
__device__ __forceinline__ void load_streams(const uint8_t* smem, uint32_t base, uint32_t sh,
                                             uint32_t (&w)[NSTR][NW]) {
  uint32_t raw[NW + 1];
#pragma unroll
  for (int i = 0; i <= NW; ++i) raw[i] = lds32(smem, base + 4u * i);
#pragma unroll
  for (int k = 0; k < NSTR; ++k)
#pragma unroll
    for (int i = 0; i < NW; ++i) w[k][i] = __funnelshift_r(raw[i], raw[i + 1], sh + uint32_t(8 / NSTR * k));
}
// 2-bit codes: a byte holds two 4-bit pairs; tables indexed by the byte
// serve its low nibble (A[e] = pair(e & 15)) and its high one (B[e] =
// pair(e >> 4)), from one stream.
// Table address of the B-bit code pair at bit `bit` of a stream read as w
// (one or more words per stream offset): lb the lane's base of the table it
// is in, A or B (bt_b_table: B, side 1 of the same entries); bytes 2 and 3
// of the address from lb: the tables may sit above 64 KB.
template <int B, int NSTR>
__device__ __forceinline__ constexpr bool bt_b_table(int bit) {
  static_assert((B == 3 && (NSTR == 2 || NSTR == 4)) || (B == 2 && NSTR == 1));
  return B == 3 ? NSTR == 2 && (bit & 2) != 0 : (bit & 4) != 0;
}
template <int B, int NSTR, int NW>
__device__ __forceinline__ uint32_t bt_addr(const uint32_t (&w)[NSTR][NW], int bit, uint32_t lb) {
  const int str = B == 3 ? (bit & 7) / (8 / NSTR) : 0;
  return __byte_perm(w[str][(bit >> 5) % NW], lb, 0x7604u | (uint32_t((bit >> 3) & 3) << 4));
}

// Table address of code pair p of a lane's segment: (pair index << 8) | lane base.
template <int B, int NW>
__device__ __forceinline__ uint32_t pair_addr(const uint32_t (&w)[NW], int p, uint32_t lb) {
  if constexpr (B == 4) {
    return __byte_perm(w[p >> 2], lb, 0x5504u | (uint32_t(p & 3) << 4));
  } else {  // 3 bits (6-bit pairs), or 2 bits (the lo half of a split: 4-bit pairs)
    const int bit = 2 * B * p, wi = bit >> 5, off = bit & 31;
    uint32_t v;
    if (off + 2 * B <= 32)
      v = off >= 8 ? (w[wi] >> (off - 8)) : (w[wi] << (8 - off));
    else
      v = __funnelshift_r(w[wi], w[wi + 1], off - 8);
    return (v & (((1u << (2 * B)) - 1u) << 8)) | lb;
  }
}

// 6-bit group k (0..3) of a 24-bit value as a table address.
__device__ __forceinline__ uint32_t group_addr(uint32_t v, int k, uint32_t lb) {
  const int off = 6 * k;
  const uint32_t s = off >= 8 ? (v >> (off - 8)) : (v << (8 - off));
  return (s & 0x3f00u) | lb;
}

struct Item {
  int seq, hkv, split, t0, t1, win_lo, n_tiles;
};

// PLAN: the split is plan_split (the device plan's), not p.split_tokens.
template <bool PLAN>
__device__ __forceinline__ Item item_at(const DecodeAttentionParams& p, int it, int plan_split) {
  Item x;
  x.hkv = it % p.n_heads_kv;
  const int r = it / p.n_heads_kv;
  x.seq = r % p.n_seqs;
  x.split = r / p.n_seqs;
  const int len = p.lengths[x.seq];
  // Splits start at the window (decode_split_start), so dead splits of a
  // windowed layer are not planned at all.
  x.t0 = decode_split_start(len, p.window, p.window_tail, p.n_sinks) + x.split * (PLAN ? plan_split : p.split_tokens);
  x.t1 = min(len, x.t0 + (PLAN ? plan_split : p.split_tokens));
  x.n_tiles = x.t1 > x.t0 ? (x.t1 - x.t0 + kTileTok - 1) / kTileTok : 0;
  // The query is at page index len - 1 + window_tail (dense tokens follow the pages).
  x.win_lo = p.window > 0 ? len + p.window_tail - p.window : INT_MIN;
  return x;
}

// Does [T0, T0 + n) hold a visible key (a sink or inside the window)?
__device__ __forceinline__ bool tokens_live(const Item& x, int T0, int n, int n_sinks) {
  return T0 < n_sinks || T0 + n - 1 >= x.win_lo;
}
// Pair k of an item: tiles 2k and 2k + 1 (the second may be past the item).
__device__ __forceinline__ int pair_tiles(const Item& x, int k) { return min(2, x.n_tiles - 2 * k); }
__device__ __forceinline__ bool pair_live(const Item& x, int k, int n_sinks) {
  return tokens_live(x, x.t0 + kPairTok * k, kTileTok * pair_tiles(x, k), n_sinks);
}


// (a & m) | (b & ~m) in one LOP3 (nvcc emits two for the masked-or form;
// integer ALU instructions are what the tile loop pays for).
__device__ __forceinline__ uint32_t select_bits(uint32_t a, uint32_t b, uint32_t m) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xE4;\n" : "=r"(r) : "r"(a), "r"(b), "r"(m));
  return r;
}

// Bits [24h, 24h + 24) of a code segment (3-bit PV: 8 codes, 4 dim pairs).
template <int NW>
__device__ __forceinline__ uint32_t bits24(const uint32_t (&w)[NW], int h) {
  const int bit = 24 * h, wi = bit >> 5, off = bit & 31;
  if (off + 24 <= 32) return w[wi] >> off;
  return __funnelshift_r(w[wi], w[wi + 1], off);
}

// PV: the pair words of two tokens X (k slot 2c) and Y (slot 2c + 1) over the
// lane's D/8 dims, D/64 words each. m tile i (dims 2i, 2i + 1 of the segment)
// is entry i & 3 of word i >> 2: LO = (X dim 2i, Y dim 2i) -> rows 0-7 of A,
// HI = (X dim 2i + 1, Y dim 2i + 1) -> rows 8-15.
// SEL: one LOP3 a pair word (select_bits) and the right shift on the FMA
// pipe (IMAD.HI), i.e. 12 fewer integer ALU instructions a d-128 tile:
// A/B 0.988 / 0.993 at Llama turbo4 8 x 32K / 8 x 128K; at d 256 the same
// change measured 1.013 (Gemma turbo4 8 x 128K), so the d-256 kernels keep
// the masked-or form (docs/kernel-notes.md, eighteenth session).
template <int VB, int NW, int NP, bool SEL>
__device__ __forceinline__ void v_pairs(const uint32_t (&x)[NW], const uint32_t (&y)[NW],
                                        uint32_t (&lo)[NP], uint32_t (&hi)[NP]) {
#pragma unroll
  for (int i = 0; i < NP; ++i) {
    if constexpr (VB == 4) {  // byte = (X nibble, Y nibble)
      if constexpr (SEL) {
        lo[i] = select_bits(x[i], y[i] << 4, 0x0F0F0F0Fu);
        hi[i] = select_bits(__umulhi(x[i], 1u << 28), y[i], 0x0F0F0F0Fu);  // x >> 4
      } else {
        lo[i] = (x[i] & 0x0F0F0F0Fu) | ((y[i] << 4) & 0xF0F0F0F0u);
        hi[i] = ((x[i] >> 4) & 0x0F0F0F0Fu) | (y[i] & 0xF0F0F0F0u);
      }
    } else if constexpr (VB == 2) {  // 4-bit group = (X code, Y code), 4 dim pairs a 16 bits
      const uint32_t a = x[i >> 1] >> (16 * (i & 1)), b = y[i >> 1] >> (16 * (i & 1));
      if constexpr (SEL) {  // bits 16+ are not read
        lo[i] = select_bits(a, b << 2, 0x3333u);
        hi[i] = select_bits(a >> 2, b, 0x3333u);
      } else {
        lo[i] = (a & 0x3333u) | ((b << 2) & 0xCCCCu);
        hi[i] = ((a >> 2) & 0x3333u) | (b & 0xCCCCu);
      }
    } else {  // 6-bit group = (X code, Y code)
      const uint32_t a = bits24(x, i), b = bits24(y, i);
      if constexpr (SEL) {  // bits 24+ are not read
        lo[i] = select_bits(a, b << 3, 0x1C71C7u);
        hi[i] = select_bits(__umulhi(a, 1u << 29), b, 0x1C71C7u);  // a >> 3
      } else {
        lo[i] = (a & 0x1C71C7u) | ((b << 3) & 0xE38E38u);
        hi[i] = ((a >> 3) & 0x1C71C7u) | (b & 0xE38E38u);
      }
    }
  }
}

template <int VB, int NP>
__device__ __forceinline__ uint32_t v_addr(const uint32_t (&w)[NP], int i, uint32_t lb) {
  if constexpr (VB == 4) {
    return __byte_perm(w[i >> 2], lb, 0x5504u | (uint32_t(i & 3) << 4));
  } else if constexpr (VB == 2) {  // 4-bit group i & 3 as a table address
    const int off = 4 * (i & 3);
    const uint32_t v = w[i >> 2], s = off >= 8 ? (v >> (off - 8)) : (v << (8 - off));
    return (s & 0xf00u) | lb;
  } else {
    return group_addr(w[i >> 2], i & 3, lb);
  }
}

// QK over one code segment of the lane's two tokens (rows tok_a, tok_a + 8,
// 8 records apart at `rec8` bytes): NS k steps of B-bit code pairs from
// word offset `off` (shift sh), B fragments qb[0 .. NS).
// NSTR: byte tables (3-bit codes, bt_addr) read as NSTR streams, A at side
// 0 (base lb) and B at side 1 (base lb1, or lb and kSide1 where IMM);
// 0: shift-and-mask addresses (pair_addr) into side 0.
template <int B, int NW, int NS, int NSTR = 0, bool IMM = false>
__device__ __forceinline__ void qk_segment(const uint8_t* smem, uint32_t off, uint32_t sh, uint32_t rec8,
                                           uint32_t lb, const uint32_t (*qb)[2], float (&s)[4],
                                           uint32_t lb1 = 0) {
  constexpr int NS1 = NSTR > 0 ? NSTR : 1;
  uint32_t wa[NS1][NW], wb[NS1][NW];
  if constexpr (NSTR > 0) {
    load_streams(smem, off, sh, wa);
    load_streams(smem, off + rec8, sh, wb);
  } else {
    load_seg(smem, off, sh, wa[0]);
    load_seg(smem, off + rec8, sh, wb[0]);
  }
  auto look = [&](const uint32_t(&w)[NS1][NW], int pi) {
    if constexpr (NSTR > 0) {
      const int bit = 2 * B * pi;
      const bool b_table = bt_b_table<B, NSTR>(bit);
      if constexpr (IMM) return lds32(smem + (b_table ? kSide1 : 0u), bt_addr<B>(w, bit, lb));
      return lds32(smem, bt_addr<B>(w, bit, b_table ? lb1 : lb));
    } else {
      return lds32(smem, pair_addr<B>(w[0], pi, lb));
    }
  };
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    const uint32_t a0 = look(wa, 2 * j);
    const uint32_t a1 = look(wb, 2 * j);
    const uint32_t a2 = look(wa, 2 * j + 1);
    const uint32_t a3 = look(wb, 2 * j + 1);
    mma16816(s, a0, a1, a2, a3, qb[j][0], qb[j][1]);
  }
}

// QK over the hi segment of an outlier K (Cfg::kOut): NS k steps of HB-bit
// codes at bit `sh` of word offset `off` (rows 8 records apart at `rec8`
// bytes), one table lookup a code (lbh: the lane's base in the hi table,
// entries 128 bytes apart), two lookups joined by a PRMT for the
// centroids and one for their residuals.
template <int HB, int NW, int NS>
__device__ __forceinline__ void qk_single(const uint8_t* smem, uint32_t off, uint32_t sh, uint32_t rec8,
                                          uint32_t lbh, const uint32_t (*qb)[2], const uint32_t (*qr)[2],
                                          float (&s)[4]) {
  uint32_t wa[NW], wb[NW];
  load_seg(smem, off, sh, wa);
  load_seg(smem, off + rec8, sh, wb);
  auto look = [&](const uint32_t(&w)[NW], int i) {
    const int bit = HB * i, wi = bit >> 5, o = bit & 31;
    uint32_t v;  // code i at bits 7 .. 7 + HB
    if (o + HB <= 32)
      v = o >= 7 ? w[wi] >> (o - 7) : w[wi] << (7 - o);
    else
      v = __funnelshift_r(w[wi], w[wi + 1], o - 7);
    return lds32(smem, (v & (((1u << HB) - 1u) << 7)) | lbh);
  };
  // A table entry holds the centroid (low half) and its fp16 residual (high
  // half): K x (q + q_res) + K_res x q, three mma a step, in fp32 sums.
  uint32_t c[4], r[4];
  auto pair = [&](const uint32_t(&w)[NW], int pi, int k) {
    const uint32_t e0 = look(w, 2 * pi), e1 = look(w, 2 * pi + 1);
    c[k] = __byte_perm(e0, e1, 0x5410u);
    r[k] = __byte_perm(e0, e1, 0x7632u);
  };
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    pair(wa, 2 * j, 0);
    pair(wb, 2 * j, 1);
    pair(wa, 2 * j + 1, 2);
    pair(wb, 2 * j + 1, 3);
    mma16816(s, c[0], c[1], c[2], c[3], qb[j][0], qb[j][1]);
    mma16816(s, c[0], c[1], c[2], c[3], qr[j][0], qr[j][1]);
    mma16816(s, r[0], r[1], r[2], r[3], qb[j][0], qb[j][1]);
  }
}

// PV over one code segment: the lane's tokens tq + 4e + 8f (records `rec`
// bytes apart) from word offset `off` (shift sh), NT m tiles of B-bit codes
// (NP pair words a token pair), weights pb0 / pb1, into acc[0 .. NT).
// Tables: lb the side-0 base, lb1 the side-1 base (where IMM: lb and kSide1).
// BT: byte tables A (side 0) and B (side 1) (bt_addr); a pair word's
// groups are at bits 0, 6, 12, 18 (3-bit) or 0, 4, 8, 12 (2-bit).
// Otherwise V's pair table, side 1. SEL: v_pairs.
template <int B, int NW, int NP, int NT, bool BT, bool SEL, bool IMM = false>
__device__ __forceinline__ void pv_segment(const uint8_t* smem, uint32_t off, uint32_t sh, uint32_t rec,
                                           uint32_t lb, uint32_t pb0, uint32_t pb1, float (*acc)[4],
                                           uint32_t lb1 = 0) {
  uint32_t lo[2][NP], hi[2][NP];
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    uint32_t xw[NW], yw[NW];
    load_seg(smem, off + 8 * f * rec, sh, xw);
    load_seg(smem, off + (4 + 8 * f) * rec, sh, yw);
    v_pairs<B, NW, NP, SEL>(xw, yw, lo[f], hi[f]);
  }
  auto side = [&](bool one, uint32_t a) {  // a: the address from lb (IMM) or from the side's base
    return lds32(smem + (IMM && one ? kSide1 : 0u), a);
  };
  auto look = [&](const uint32_t(&w)[NP], int i) {
    if constexpr (BT && B == 3) {
      // The stream at bit offset 4. The split kernels (IMM) shift on the
      // FMA pipe (IMAD.HI); measured only together with IMM.
      const uint32_t v[2][1] = {{w[i >> 2]}, {IMM && SEL ? __umulhi(w[i >> 2], 1u << 28) : w[i >> 2] >> 4}};
      const int bit = 6 * (i & 3);
      const bool b_table = bt_b_table<3, 2>(bit);
      return side(b_table, bt_addr<3>(v, bit, IMM || !b_table ? lb : lb1));
    } else if constexpr (BT) {
      const uint32_t v[1][1] = {{w[i >> 2]}};
      const int bit = 4 * (i & 3);
      const bool b_table = bt_b_table<2, 1>(bit);
      return side(b_table, bt_addr<2>(v, bit, IMM || !b_table ? lb : lb1));
    } else {
      return side(true, v_addr<B>(w, i, IMM ? lb : lb1));
    }
  };
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const uint32_t a0 = look(lo[0], i);
    const uint32_t a1 = look(hi[0], i);
    const uint32_t a2 = look(lo[1], i);
    const uint32_t a3 = look(hi[1], i);
    mma16816(acc[i], a0, a1, a2, a3, pb0, pb1);
  }
}

// n / d for 0 <= n < 2^31 by a multiply (Granlund-Montgomery, round-up
// variant): the producer splits a token index into page and slot every tile.
struct FastDiv {
  uint32_t d = 1, mul = 1, shift = 0;
  __device__ explicit FastDiv(uint32_t divisor) : d(divisor) {
    while ((1u << shift) < d) ++shift;
    mul = uint32_t(((1ull << 32) * ((1ull << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return (__umulhi(n, mul) + n) >> shift;
  }
};

// The loads of one warp: the tile pairs of the block's items that this warp
// computes, in the same order, one pair ahead of the computation. A pair is
// the warp's two adjacent tiles (tiles 2k, 2k + 1 of an item for k = warp,
// warp + W, ...), so one copy per K and V run moves 32 records: half the
// producer work of a copy per tile. The page of the next pair is read one
// pair early so that its latency is hidden; without a window and with pages
// of whole pairs, the pages and rows of up to 32 next pairs of an item are
// read at once, one lane each, and a pair's advance is two shuffles.
// Word i of the device plan in shared memory (Cfg::kPlanOff; written by
// plan_splits_on_device), read at each use.
template <class C>
__device__ __forceinline__ int plan_word(int i) {
  extern __shared__ __align__(128) uint8_t smem[];
  return reinterpret_cast<const volatile int*>(smem + C::kPlanOff)[i];
}

template <class C, bool PLAN>
struct Producer {
  int it, k, page, row;  // row: head * page_tokens + slot of the pair's first record
  // PLAN: the device plan's tokens per split.
  __device__ __forceinline__ static int split_of() {
    if constexpr (PLAN) return plan_word<C>(0);
    return 0;
  }
  int page2, row2;       // the second tile's, where it starts on the next page
  int n_tok;             // records per run: 16 or 32
  bool done, split;      // split: the second tile is on another page
  Item x;
  FastDiv pdiv;
  // Descriptors of the warp's next pairs of the current item, lane j holding
  // the j-th (page; row, bit 31 set for a 16-record pair), dj of dn used.
  // Only where every pair with tiles is live and inside one page (no window,
  // page_tokens a multiple of 32): then a pair's advance is two shuffles.
  int dpage = 0, drow = 0, dj = 0, dn = 0;

  __device__ explicit Producer(int page_tokens) : pdiv(uint32_t(page_tokens)) {}

  // The next pair from the descriptor batch (lane dj holds it).
  __device__ __forceinline__ void take_descriptor() {
    const int d = __shfl_sync(0xffffffffu, drow, dj);
    page = __shfl_sync(0xffffffffu, dpage, dj);
    row = d & 0x7fffffff;
    n_tok = d < 0 ? kTileTok : kPairTok;
    ++dj;
  }

  __device__ void init(const DecodeAttentionParams& p, int n_items, int warp) {
    it = blockIdx.x;
    done = false;
    k = warp - C::kWarps;
    if (it < n_items) x = item_at<PLAN>(p, it, split_of());
    advance(p, n_items, warp);
  }
  __device__ void advance(const DecodeAttentionParams& p, int n_items, int warp) {
    k += C::kWarps;
    if (dj < dn) {
      take_descriptor();
      return;
    }
    for (;;) {
      if (it >= n_items) {
        done = true;
        return;
      }
      if (2 * k < x.n_tiles) {
        if (pair_live(x, k, p.n_sinks)) break;
        k += C::kWarps;
        continue;
      }
      it += gridDim.x;
      if (it < n_items) x = item_at<PLAN>(p, it, split_of());
      k = warp;
    }
    if (p.window <= 0 && p.page_tokens % kPairTok == 0) {  // refill the descriptors from pair k on
      const int lane = threadIdx.x & 31, kj = k + lane * C::kWarps;
      dn = min(32, (x.n_tiles - 2 * k + 2 * C::kWarps - 1) / (2 * C::kWarps));
      if (lane < dn) {
        const uint32_t t = uint32_t(x.t0 + kPairTok * kj), pi = pdiv.div(t), slot = t - pi * pdiv.d;
        dpage = p.page_table[size_t(x.seq) * p.max_pages_per_seq + pi];
        drow = (x.hkv * p.page_tokens + int(slot)) | (pair_tiles(x, kj) == 1 ? int(0x80000000u) : 0);
      }
      dj = 0;
      split = false;
      take_descriptor();
      return;
    }
    const uint32_t t = uint32_t(x.t0 + kPairTok * k), pi = pdiv.div(t), slot = t - pi * pdiv.d;
    const int* pt = p.page_table + size_t(x.seq) * p.max_pages_per_seq + pi;
    row = x.hkv * p.page_tokens + int(slot);
    page = __shfl_sync(0xffffffffu, pt[0], 0);
    n_tok = kTileTok * pair_tiles(x, k);
    // Pairs start at multiples of 32 tokens, so only a page size that is an
    // odd multiple of 16 puts a pair's second tile on the next page.
    split = n_tok == kPairTok && slot + kTileTok == pdiv.d;
    if (split) {
      page2 = __shfl_sync(0xffffffffu, pt[1], 0);
      row2 = x.hkv * p.page_tokens;
    }
  }
  // Copies the next pair into the stage at shared address sdst (K records at
  // 0, V records at 32 kKRec). sm_90: lane 0 starts the bulk copies
  // completing on the stage's mbarrier `bar` (nothing past the last pair: the
  // consumer never waits for more pairs than were issued). Older GPUs:
  // per-lane cp.async, always one group committed (empty past the last pair),
  // so group i is pair i.
  // tmk / tmv: the pool's K and V tensor maps (sm_90), or null: bulk copies.
  __device__ void issue(const DecodeAttentionParams& p, int n_items, int warp, int lane,
                        uint32_t sdst, uint32_t bar, const CUtensorMap* tmk, const CUtensorMap* tmv) {
    constexpr uint32_t kVDst = C::kVOff;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (done) return;
    if (tmk != nullptr && !split) {
      // The boxes are always a whole pair (32 records; a pair's second tile
      // past the item is copied and not read). Coordinates: 8-record chunk
      // row / 8 of page `page` (row is a multiple of 32).
      if (lane == 0) {
        mbar_expect_tx(bar, kPairTok * (C::kKRec + C::kVRec));
        tensor_g2s_4d(sdst, tmk, 0, row >> 3, 0, page, bar);
        if constexpr (!C::kOneCopy) tensor_g2s_4d(sdst + kVDst, tmv, 0, row >> 3, 0, page, bar);
      }
    } else if (lane == 0) {
      const uint8_t* pg = p.pool + size_t(page) * p.page_bytes;
      mbar_expect_tx(bar, uint32_t(n_tok) * (C::kKRec + C::kVRec));
      if (!split) {
        copy_g2s(sdst, pg + size_t(row) * C::kKRec, uint32_t(n_tok) * C::kKRec, bar);
        copy_g2s(sdst + kVDst, pg + p.v_region_offset + size_t(row) * C::kVRec, uint32_t(n_tok) * C::kVRec,
                 bar);
      } else {
        const uint8_t* pg2 = p.pool + size_t(page2) * p.page_bytes;
        copy_g2s(sdst, pg + size_t(row) * C::kKRec, kTileTok * C::kKRec, bar);
        copy_g2s(sdst + kVDst, pg + p.v_region_offset + size_t(row) * C::kVRec, kTileTok * C::kVRec, bar);
        copy_g2s(sdst + kTileTok * C::kKRec, pg2 + size_t(row2) * C::kKRec, kTileTok * C::kKRec, bar);
        copy_g2s(sdst + kVDst + kTileTok * C::kVRec, pg2 + p.v_region_offset + size_t(row2) * C::kVRec,
                 kTileTok * C::kVRec, bar);
      }
    }
    advance(p, n_items, warp);
#else
    (void)bar;
    (void)tmk;
    (void)tmv;
    if (!done) {
      // Per tile j, 16-byte chunk lane + 32 i of each run (K: kKRec chunks, V: kVRec).
      for (int j = 0; j < n_tok / kTileTok; ++j) {
        const int pj = j == 1 && split ? page2 : page;
        const int rj = j == 1 ? (split ? row2 : row + kTileTok) : row;
        const uint8_t* pg = p.pool + size_t(pj) * p.page_bytes + 16 * lane;
        const uint8_t* gk = pg + size_t(rj) * C::kKRec;
        const uint8_t* gv = pg + p.v_region_offset + size_t(rj) * C::kVRec;
        const uint32_t sk = sdst + j * kTileTok * C::kKRec + 16 * lane;
        const uint32_t sv = sdst + kVDst + j * kTileTok * C::kVRec + 16 * lane;
#pragma unroll
        for (int i = 0; i < (C::kKRec + 31) / 32; ++i)
          if (lane + 32 * i < C::kKRec) cp_async16(sk + 512 * i, gk + 512 * i);
#pragma unroll
        for (int i = 0; i < (C::kVRec + 31) / 32; ++i)
          if (lane + 32 * i < C::kVRec) cp_async16(sv + 512 * i, gv + 512 * i);
      }
    }
    cp_async_commit();
    if (!done) advance(p, n_items, warp);
#endif
  }
};

// What a launch writes and where its splits were planned; each mode is an
// instantiation of its own, so that the partials kernels compile as without
// the others.
//  - kTcPartials: a partial per split for the merge kernel, host plan;
//  - kTcDirect: the output itself, no merge (DecodeAttentionParams::direct);
//  - kTcDevicePlan: partials, splits planned by the kernel from the device's
//    lengths (DecodeAttentionParams::device_plan; captured launches).
enum TcMode : int { kTcPartials = 0, kTcDirect = 1, kTcDevicePlan = 2 };

// The device plan: the host plan's cost model (best_split) over the lengths on
// the device, by the whole block (every block finds the same plan). G threads take
// a candidate split and sum its items over every G-th sequence, so a batch of
// any size costs a few loads and divisions a thread; the candidates' costs
// meet as 64-bit keys (cost in rows << 9 | 511 - index: the least is the
// cheapest plan, the longer split on a tie, as on the host) in one barrier.
// Thread 0 then writes {split_tokens, n_items} to s_plan (plan_word; n_splits
// = the longest span over split_tokens, at least 1, splits a sequence), in
// block 0 also {n_splits, split_tokens} to p.device_plan for the merge.
// scratch: 2 words a warp of shared memory. (Per-warp copies of the plan,
// one barrier fewer, cost the d-128 kernels spills: the warp's offset.)
template <int NT>
__device__ void plan_splits_on_device(const DecodeAttentionParams& p, uint32_t* scratch, int* s_plan) {
  constexpr int W = NT / 32;
  constexpr uint32_t kUnit = kPairTok * W;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto span = [&](int s) {
    const int len = p.lengths[s];
    return uint32_t(len - decode_split_start(len, p.window, p.window_tail, p.n_sinks));
  };
  uint32_t l_max = 0;
#pragma unroll 1
  for (int s = lane; s < p.n_seqs; s += 32) l_max = max(l_max, span(s));
  l_max = __reduce_max_sync(0xffffffffu, l_max);
  const int rows_min = p.split_tokens / int(kUnit);
  const int n_cand = decode_split_candidates(rows_min, int(l_max), int(kUnit));
  int G = 1;  // threads a candidate (a power of two, <= 32)
  while (G < 32 && n_cand * 2 * G <= NT) G *= 2;
  const uint32_t slots = gridDim.x, heads = uint32_t(p.n_heads_kv);
  uint64_t best = ~0ull;
#pragma unroll 1
  for (int base = 0; base < n_cand; base += NT / G) {  // (uniform: the shuffles below need every lane)
    const int i = base + int(threadIdx.x) / G, sub = int(threadIdx.x) % G;
    const uint32_t rows = i < n_cand ? uint32_t(decode_split_candidate(i, rows_min)) : 1u, split = rows * kUnit;
    uint32_t items = 0;
    if (i < n_cand)
#pragma unroll 1
      for (int s = sub; s < p.n_seqs; s += G) items += (span(s) + split - 1) / split;
    for (int o = G / 2; o >= 1; o /= 2) items += __shfl_xor_sync(0xffffffffu, items, o);
    if (i < n_cand) {
      const uint32_t rounds = (items * heads + slots - 1) / slots;  // (items < 2^31: the workspace's partials)
      best = min(best, (uint64_t(rounds) * (rows + 1)) << 9 | uint32_t(511 - i));
    }
  }
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) best = min(best, __shfl_xor_sync(0xffffffffu, best, o));
  if (lane == 0) {
    scratch[2 * warp] = uint32_t(best);
    scratch[2 * warp + 1] = uint32_t(best >> 32);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 0; w < W; ++w) best = min(best, uint64_t(scratch[2 * w]) | uint64_t(scratch[2 * w + 1]) << 32);
    const int split_tokens = int(decode_split_candidate(511 - int(best & 511), rows_min) * kUnit);
    const int n_splits = max(1, int((l_max + split_tokens - 1) / split_tokens));
    s_plan[0] = split_tokens;
    s_plan[1] = n_splits * p.n_seqs * p.n_heads_kv;
    if (blockIdx.x == 0) {
      p.device_plan[0] = n_splits;
      p.device_plan[1] = split_tokens;
    }
  }
  __syncthreads();
}

template <int D, int KB, int VB, bool SPLIT, int HB, int MODE>
__global__ void __launch_bounds__(Cfg<D, KB, VB, SPLIT, HB>::kThreads, 1)
    decode_tc_kernel(DecodeAttentionParams p, int n_items, const float* __restrict__ q,
                     float* __restrict__ part_o, float* __restrict__ part_lse,
                     const __grid_constant__ CUtensorMap tmap_k, const __grid_constant__ CUtensorMap tmap_v,
                     int tensor_copy) {
  using C = Cfg<D, KB, VB, SPLIT, HB>;
  constexpr bool DIRECT = MODE == kTcDirect, PLAN = MODE == kTcDevicePlan;
  constexpr bool OUT = C::kOut;
  constexpr int W = C::kWarps, S = C::kStages;
  constexpr int kHalfSteps = D / 32;  // split: QK k steps (= PV m tiles) of each half
  constexpr int kSteps = D / 16;   // QK k steps = PV m tiles
  constexpr int kQRegs = D / 32;   // query values per lane in the rotation
  constexpr int kPW = D / 64;      // PV pair words per token pair
  constexpr bool kSelPairs = D <= 128;  // v_pairs' SEL form (measured faster at d <= 128 only)
  extern __shared__ __align__(128) uint8_t smem[];
  __half* sQ = reinterpret_cast<__half*>(smem + C::kQOff);            // [8][D]
  __half* sQr = sQ + kMaxGroup * D;                                    // outlier K: [8][D/8]
  float* sRotX = reinterpret_cast<float*>(sQr + kMaxGroup * C::kOHiDims);  // outlier K: [8][D]
  float* sRotS1 = sRotX + kMaxGroup * D;                                // [D]
  float* sRotS2 = sRotS1 + D;                                           // [D]
  int* sRotPerm = reinterpret_cast<int*>(sRotS2 + D);                   // [D]
  RotMeta* sRotMeta = reinterpret_cast<RotMeta*>(sRotPerm + D);         // [2]
  float* sM = reinterpret_cast<float*>(smem + C::kSmallOff);          // [W][8]
  float* sL = sM + W * kMaxGroup;                                      // [W][8]
  float* sF = sL + W * kMaxGroup;                                      // [W][8]
  float* sQs = sF + W * kMaxGroup;                                     // [8]
  float* sInvL = sQs + kMaxGroup;                                      // [8]
  uint32_t* sScr = reinterpret_cast<uint32_t*>(sInvL + kMaxGroup);    // [W]

  // The warp index through a shuffle from lane 0: the compiler then knows it
  // is warp-uniform, and so is the producer state derived from it.
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x >> 5), 0), lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;  // mma groupID, thread in group
  const int g = p.group, n_heads_q = p.n_heads_kv * g;
  const uint32_t smem_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  // This lane's table copy: K's and V's (byte tables: the A and B tables').
  const uint32_t lbK = 4u * lane, lbV = 128u + 4u * lane;
  const CUtensorMap* tmk = tensor_copy ? &tmap_k : nullptr;  // sm_90: tensor copies
  const CUtensorMap* tmv = tensor_copy ? &tmap_v : nullptr;
  auto stage_off = [&](int s) { return uint32_t(C::kStageOff + (warp * S + s) * C::kStageBytes); };
  auto bar_at = [&](int s) { return smem_s + uint32_t(C::kBarOff + 8 * (warp * S + s)); };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (lane == 0) {
    for (int s = 0; s < S; ++s) mbar_init(bar_at(s), 1);
    fence_mbar_init();
  }
  __syncwarp();
#endif
  uint32_t cphase = 0;  // parity of the current use of stage cstage (sm_90)

  // Device plan: the split and the item count come from shared memory at
  // each use (plan_word; Producer::split_of()). (The count through a lambda
  // measured as a different schedule of the other kernels: a ternary.)
  if constexpr (PLAN)
    plan_splits_on_device<C::kThreads>(p, reinterpret_cast<uint32_t*>(sM), reinterpret_cast<int*>(smem + C::kPlanOff));

  // 1. Start the loads, then build the table while they fly.
  Producer<C, PLAN> prod(p.page_tokens);
  prod.init(p, (PLAN ? plan_word<C>(1) : n_items), warp);
  int pstage = 0, cstage = 0;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    prod.issue(p, (PLAN ? plan_word<C>(1) : n_items), warp, lane, smem_s + stage_off(pstage), bar_at(pstage), tmk, tmv);
    pstage = pstage + 1 == S ? 0 : pstage + 1;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // A 16-bit query was widened by the kernel before this one, as whose
  // programmatic dependent this one may have started: q_f32 is complete after
  // this wait (a no-op for a plain launch). Before the trigger below, so that
  // the dense part, which reads q at its start, launches only after it.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  // The merge kernel may launch once every block got here (all of them are
  // resident: one wave); it waits on the device for this grid's writes.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  {
    // One thread per (entry, side): its 32 lane copies as 8 16-byte stores,
    // started at chunk `lane % 8` so that a warp's stores spread over all banks.
    constexpr int kEntries = C::kPairTables / 256;
    for (int i = threadIdx.x; i < 2 * kEntries; i += C::kThreads) {
      const int e = i >> 1, side = i & 1;
      uint32_t val = 0;
      if constexpr (SPLIT && C::kByte3) {  // [hi: A | B][lo: nibble A | B] (K's codebooks = V's)
        const int el = e & 255, pr = e < 256 ? (side ? el >> 2 : el & 63) : (side ? el >> 4 : el & 15);
        const float* cb = p.k_split.seg[e < 256 ? 0 : 1].centroids;
        val = e < 256 ? pack_half2(cb[pr & 7], cb[pr >> 3]) : pack_half2(cb[pr & 3], cb[pr >> 2]);
      } else if constexpr (SPLIT) {  // entries past the hi half's are the lo half's table
        const bool lo = e >= (1 << (2 * KB));
        const int bits = lo ? C::kLB : KB, el = lo ? e - (1 << (2 * KB)) : e;
        const float* cb = (side ? p.v_split : p.k_split).seg[lo ? 1 : 0].centroids;
        val = pack_half2(cb[el & ((1 << bits) - 1)], cb[el >> bits]);
      } else if constexpr (OUT) {  // side 0: the lo segment's code pairs, side 1: V's
        const int bits = side ? VB : KB;
        const float* cb = side ? p.v.centroids : p.k_split.seg[1].centroids;
        if (e < (1 << (2 * bits))) val = pack_half2(cb[e & ((1 << bits) - 1)], cb[e >> bits]);
      } else if constexpr (C::kByte3) {  // side 0: A[e] = pair(e & 63), side 1: B[e] = pair(e >> 2)
        const int pr = side ? e >> 2 : e & 63;
        val = pack_half2(p.k.centroids[pr & 7], p.k.centroids[pr >> 3]);
      } else if (C::kKStreams == 4 && side == 0) {  // K: A[e] = pair(e & 63)
        val = pack_half2(p.k.centroids[e & 7], p.k.centroids[(e >> 3) & 7]);
      } else {
        const int bits = side ? VB : KB;
        const float* cb = side ? p.v.centroids : p.k.centroids;
        if (e < (1 << (2 * bits))) val = pack_half2(cb[e & ((1 << bits) - 1)], cb[e >> bits]);
      }
      uint4* dst = reinterpret_cast<uint4*>(smem + e * 256 + side * 128);
      const uint4 v4 = make_uint4(val, val, val, val);
#pragma unroll
      for (int j = 0; j < 8; ++j) dst[(j + lane) & 7] = v4;
    }
    if constexpr (OUT) {  // the query rotation's parameters; the hi segment's single-code table
      stage_split_rotation(p.k_split, C::kOHiDims, sRotS1, sRotS2, sRotPerm, sRotMeta);
      const float* cb = p.k_split.seg[0].centroids;
      for (int e = threadIdx.x; e < (1 << HB); e += C::kThreads) {
        const float c = cb[e], r = c - __half2float(__float2half_rn(c));
        const uint32_t w = pack_half2(c, r);  // the centroid in fp16 and what fp16 lost of it
        const uint4 v4 = make_uint4(w, w, w, w);
        uint4* dst = reinterpret_cast<uint4*>(smem + C::kHiTable + e * 128);
#pragma unroll
        for (int j = 0; j < 8; ++j) dst[(j + lane) & 7] = v4;
      }
    }
  }

  // The query rotation (warp h < g rotates head h): signs, FWHT, 1/sqrt(D).
  // Outlier K: qreg[0] holds hi element `lane` (lane < D/8), qreg[1 + k] lo
  // element lane + 32 k: each segment starts at lane 0 (warp_rotate_regs).
  constexpr int kQR = OUT ? 1 + (C::kOLoDims + 31) / 32 : kQRegs;
  float ksign[kQRegs], qreg[kQR];
  // Split: element j of [hi half | lo half] is channel channels[hkv][j];
  // each half has its own signs and scale.
  auto load_q = [&](int it) {
    const int hkv = it % p.n_heads_kv, seq = (it / p.n_heads_kv) % p.n_seqs;
    const float* qv = q + (size_t(seq) * n_heads_q + size_t(hkv) * g + warp) * D;
    if constexpr (OUT) {
      const int* ch = p.k_split.channels + size_t(hkv) * D;
#pragma unroll
      for (int r = 0; r < kQR; ++r) {
        const int i = r == 0 ? lane : C::kOHiDims + lane + 32 * (r - 1);
        const bool in = r == 0 ? lane < C::kOHiDims : i < D;
        qreg[r] = in ? __ldg(qv + __ldg(ch + i)) : 0.0f;
      }
    } else if constexpr (SPLIT) {
      const int* ch = p.k_split.channels + size_t(hkv) * D;
#pragma unroll
      for (int r = 0; r < kQRegs; ++r) qreg[r] = __ldg(qv + __ldg(ch + lane + 32 * r));
    } else {
#pragma unroll
      for (int r = 0; r < kQRegs; ++r) qreg[r] = __ldg(qv + lane + 32 * r);
    }
  };
  int q_item = -1;  // the item whose query qreg holds (loaded one item ahead)
  if (!OUT && warp < g) {  // (outlier K: the signs are staged in shared memory)
#pragma unroll
    for (int r = 0; r < kQRegs; ++r) {
      if constexpr (SPLIT) {
        const int half = r < kQRegs / 2 ? 0 : 1;
        ksign[r] = __ldg(p.k_split.seg[half].rot.signs1 + lane + 32 * r - half * (D / 2));
      } else {
        ksign[r] = __ldg(p.k.signs + lane + 32 * r);
      }
    }
  }

  if constexpr (OUT) __syncthreads();  // the rotation's parameters, before the first item's query
  for (int it = blockIdx.x; it < (PLAN ? plan_word<C>(1) : n_items); it += gridDim.x) {
    const Item x = item_at<PLAN>(p, it, Producer<C, PLAN>::split_of());
    const size_t row0 = (size_t(x.seq) * n_heads_q + size_t(x.hkv) * g) * p.n_splits + x.split;
    if (x.n_tiles == 0) {  // past the sequence: a neutral partial (the merge skips its o)
      if constexpr (DIRECT) {  // what the merge writes for it: the rotation of 0, lse -inf
        const size_t orow = size_t(x.seq) * n_heads_q + size_t(x.hkv) * g;
        for (int idx = threadIdx.x; idx < g * D; idx += C::kThreads)
          io_store(p.direct_out, orow * D + idx, 0.0f * __ldg(p.v.signs + idx % D), p.out_dtype);
        if (p.direct_lse != nullptr && int(threadIdx.x) < g) p.direct_lse[orow + threadIdx.x] = kNegInf;
      } else if (int(threadIdx.x) < g) {
        part_lse[row0 + size_t(threadIdx.x) * p.n_splits] = kNegInf;
      }
      continue;
    }

    // 2. Rotated queries -> sQ (fp16, scaled by max |q| of the head -> sQs).
    if (warp < g) {
      if (q_item != it) load_q(it);  // first item, or the prefetched one was empty
      float v[kQRegs];
      float amax = 0.0f;
      if constexpr (OUT) {  // gathered [hi | lo]: each segment's rotation, by this warp
        constexpr int H = C::kOHiDims, EL = kQR - 1;
        float* xr = sRotX + warp * D;  // [hi | lo]: the permutations' scratch, then the result
        float th[1] = {lane < H ? __fmul_rn(qreg[0], sRotS1[lane]) : 0.0f}, tl[EL];
#pragma unroll
        for (int k = 0; k < EL; ++k)
          tl[k] = H + lane + 32 * k < D ? __fmul_rn(qreg[1 + k], sRotS1[H + lane + 32 * k]) : 0.0f;
        warp_rotate_regs(sRotMeta[0], H, th, xr, sRotS2, sRotPerm, lane);
        warp_rotate_regs(sRotMeta[1], C::kOLoDims, tl, xr + H, sRotS2 + H, sRotPerm + H, lane);
        if (lane < H) xr[lane] = th[0];
#pragma unroll
        for (int k = 0; k < EL; ++k)
          if (H + lane + 32 * k < D) xr[H + lane + 32 * k] = tl[k];
        __syncwarp();
#pragma unroll
        for (int r = 0; r < kQRegs; ++r) {
          v[r] = xr[lane + 32 * r];
          amax = fmaxf(amax, fabsf(v[r]));
        }
        __syncwarp();  // the next item's rotation rewrites xr
      } else {
#pragma unroll
        for (int r = 0; r < kQRegs; ++r) v[r] = qreg[r] * ksign[r];
        if constexpr (SPLIT)
          fwht_register_blocks<kQRegs / 2>(v);  // each half: D/64 registers a lane
        else
          fwht_registers(v);
#pragma unroll
        for (int h = 1; h < 32; h *= 2)
#pragma unroll
          for (int r = 0; r < kQRegs; ++r) {
            const float o = __shfl_xor_sync(0xffffffffu, v[r], h);
            v[r] = (lane & h) ? o - v[r] : v[r] + o;
          }
#pragma unroll
        for (int r = 0; r < kQRegs; ++r) {
          if constexpr (SPLIT)
            v[r] *= p.k_split.seg[r < kQRegs / 2 ? 0 : 1].rot.block_scale[0];
          else
            v[r] *= p.k.post_scale;
          amax = fmaxf(amax, fabsf(v[r]));
        }
      }
#pragma unroll
      for (int o = 16; o >= 1; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      const float qs = amax > 0.0f ? amax : 1.0f, inv = 1.0f / qs;
#pragma unroll
      for (int r = 0; r < kQRegs; ++r) {
        const float x = v[r] * inv;
        const __half h = __float2half_rn(x);
        sQ[warp * D + lane + 32 * r] = h;
        // Outlier K: the hi segment's query in two fp16 terms (its scores
        // carry the largest keys; fp16 alone measured 1.6e-3 against KvCache).
        if (OUT && lane + 32 * r < C::kOHiDims)
          sQr[warp * C::kOHiDims + lane + 32 * r] = __float2half_rn(x - __half2float(h));
      }
      if (lane == 0) sQs[warp] = qs;
    }
    __syncthreads();  // (A) table (first item), sQ; the last item's merge reads are done
    if (warp < g && it + int(gridDim.x) < (PLAN ? plan_word<C>(1) : n_items)) {  // in flight during the tiles
      load_q(it + gridDim.x);
      q_item = it + gridDim.x;
    }

    // 3. Query fragments (the B operand of QK): lane (head gq, tq) holds dims
    // tq*D/4 .. (tq+1)*D/4 - 1 of head gq. kmul: score -> base-2 logit factor of
    // this lane's two softmax columns, heads 2tq and 2tq + 1.
    // Split: k steps 0 .. D/32 - 1 take dims tq*D/8 .. of the hi half, the
    // rest the same dims of the lo half (each step inside one half, so that
    // the two halves' scores, with their own scales, are separate sums).
    uint32_t qb[kSteps][2];
    uint32_t qr[C::kOHiSteps > 0 ? C::kOHiSteps : 1][2];  // outlier K: the hi steps' query residuals
    if (OUT && gq < g) {
#pragma unroll
      for (int j = 0; j < C::kOHiSteps; ++j) {
        const uint2 t = *reinterpret_cast<const uint2*>(sQr + gq * C::kOHiDims + tq * (C::kOHiDims / 4) + 4 * j);
        qr[j][0] = t.x;
        qr[j][1] = t.y;
      }
      // Outlier K: k steps 0 .. kOHiSteps - 1 take the lane's quarter of the
      // hi segment (D/32 dims from tq*D/32), the rest its quarter of the lo
      // one (7D/32 dims from D/8 + tq*7D/32); 4 dims a step.
#pragma unroll
      for (int j = 0; j < kSteps; ++j) {
        const int dim = j < C::kOHiSteps ? tq * (C::kOHiDims / 4) + 4 * j
                                         : C::kOHiDims + tq * (C::kOLoDims / 4) + 4 * (j - C::kOHiSteps);
        const uint2 t = *reinterpret_cast<const uint2*>(sQ + gq * D + dim);
        qb[j][0] = t.x;
        qb[j][1] = t.y;
      }
    } else if (gq < g) {
#pragma unroll
      for (int i = 0; i < D / 32; ++i) {
        const uint4* src =
            SPLIT ? reinterpret_cast<const uint4*>(sQ + gq * D + (i < D / 64 ? 0 : D / 2) + tq * (D / 8)) +
                        (i % (D / 64))
                  : reinterpret_cast<const uint4*>(sQ + gq * D + tq * (D / 4)) + i;
        const uint4 t = *src;
        qb[2 * i][0] = t.x;
        qb[2 * i][1] = t.y;
        qb[2 * i + 1][0] = t.z;
        qb[2 * i + 1][1] = t.w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kSteps; ++j) qb[j][0] = qb[j][1] = 0u;
#pragma unroll
      for (int j = 0; j < C::kOHiSteps; ++j) qr[j][0] = qr[j][1] = 0u;
    }
    const float kscale = p.sm_scale * (p.softcap > 0.0f ? 1.0f : kLog2e);
    float kmul[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) kmul[e] = 2 * tq + e < g ? sQs[2 * tq + e] * kscale : 0.0f;

    float acc[kSteps][4];  // O^T: rows = dims (tile i), columns = heads 2tq, 2tq + 1
#pragma unroll
    for (int i = 0; i < kSteps; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    // Heads 2tq + e: running max of x + log2 s_v, and this lane's part of sum 2^(x - m).
    float m[2] = {kNegInf, kNegInf}, l[2] = {0.0f, 0.0f};
    float msub[2] = {0.0f, 0.0f};  // m, or 0 while m is -inf (2^(x - msub): -inf -> 0, never NaN)
    // The two tokens of this lane in QK (S^T rows gq, gq + 8).
    const int tok_a = (gq >> 1) + 4 * (gq & 1);
    // This lane's code segments inside a tile: QK tokens tok_a and tok_a + 8
    // at koff (+ 8 records), PV tokens tq + 4e + 8f at voff (+ (4e + 8f)
    // records); 4-byte aligned parts and the shift they share (records are
    // even-sized, so 4 records are a multiple of 4 bytes).
    const uint32_t koff_raw = uint32_t(tok_a * C::kKRec + tq * C::kKSeg);
    const uint32_t voff_raw = uint32_t(tq * C::kVRec + gq * C::kVSeg);
    const uint32_t koff = koff_raw & ~3u, ksh = (koff_raw & 3u) * 8u;
    const uint32_t voff = voff_raw & ~3u, vsh = (voff_raw & 3u) * 8u;
    const uint32_t kscale_off = uint32_t(tok_a * C::kKRec + C::kKCode);
    const uint32_t vscale_off = uint32_t(tok_a * C::kVRec + C::kVCode);
    // Split: the same lanes and tokens, one code segment per half (in bits:
    // a lane's part of a 3-bit half need not start on a byte), the lo half's
    // scale last in the record, its table at kLoTable.
    const uint32_t khi_bit = uint32_t(tok_a * C::kKRec * 8 + tq * (D / 8) * KB);
    const uint32_t klo_bit = uint32_t((tok_a * C::kKRec + C::kLoOff) * 8 + tq * (D / 8) * C::kLB);
    const uint32_t vhi_bit = uint32_t(tq * C::kVRec * 8 + gq * (D / 16) * KB);
    const uint32_t vlo_bit = uint32_t((tq * C::kVRec + C::kLoOff) * 8 + gq * (D / 16) * C::kLB);
    const uint32_t khi_off = (khi_bit >> 3) & ~3u, khi_sh = khi_bit & 31u;
    const uint32_t klo_off = (klo_bit >> 3) & ~3u, klo_sh = klo_bit & 31u;
    const uint32_t vhi_off = (vhi_bit >> 3) & ~3u, vhi_sh = vhi_bit & 31u;
    const uint32_t vlo_off = (vlo_bit >> 3) & ~3u, vlo_sh = vlo_bit & 31u;
    const uint32_t kscale_lo = uint32_t(tok_a * C::kKRec + C::kKRec - 2);
    const uint32_t vscale_lo = uint32_t(tok_a * C::kVRec + C::kVRec - 2);
    const uint32_t lbKlo = lbK | uint32_t(C::kLoTable);  // split: the lo half's side-0 base
    // Outlier K: the lane's quarter of each segment (in bits: HB- and 3-bit
    // parts need not start on a byte); the hi scale at kKCode, the lo one last.
    const uint32_t kohi_bit = uint32_t(tok_a * C::kKRec * 8 + tq * (C::kOHiDims / 4) * HB);
    const uint32_t kolo_bit =
        uint32_t((tok_a * C::kKRec + C::kOHiCode + 2) * 8 + tq * (C::kOLoDims / 4) * KB);
    const uint32_t kohi_off = (kohi_bit >> 3) & ~3u, kohi_sh = kohi_bit & 31u;
    const uint32_t kolo_off = (kolo_bit >> 3) & ~3u, kolo_sh = kolo_bit & 31u;
    const uint32_t lbKhi = lbK | uint32_t(C::kHiTable);

    // 4. The warp's tile pairs: tiles 2kp and 2kp + 1 for kp = warp, warp + W, ...
    for (int kp = warp; 2 * kp < x.n_tiles; kp += W) {
      if (!pair_live(x, kp, p.n_sinks)) continue;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      mbar_wait(bar_at(cstage), cphase);
#else
      cp_async_wait<S - 2>();
#endif
      __syncwarp();  // this stage is in (every lane); every lane is done with the previous one
      prod.issue(p, (PLAN ? plan_word<C>(1) : n_items), warp, lane, smem_s + stage_off(pstage), bar_at(pstage), tmk, tmv);
      pstage = pstage + 1 == S ? 0 : pstage + 1;
      const uint32_t pair_kb = stage_off(cstage);
      cstage = cstage + 1 == S ? 0 : cstage + 1;
      cphase ^= cstage == 0 ? 1u : 0u;
      const int n_pt = pair_tiles(x, kp);
#pragma unroll 1
      for (int j = 0; j < n_pt; ++j) {
        const int T0 = x.t0 + kPairTok * kp + kTileTok * j;
        if (!tokens_live(x, T0, kTileTok, p.n_sinks)) continue;  // the dead half of a live pair
        const uint32_t kb = pair_kb + j * (kTileTok * C::kKRec);
        const uint32_t vb = pair_kb + C::kVOff + j * (kTileTok * C::kVRec);

        // QK: S^T (16 tokens x 8 heads) = K (A: rows = tokens) x Q^T (B). Row r
        // is token r/2 + 4(r%2) (+8 for rows 8-15), the PV k slot order below.
        float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        float s2[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // split: the lo half's (s: the hi half's)
        if constexpr (SPLIT) {
          // (side 1 through kSide1: IMM)
          qk_segment<KB, C::kKHiW, kHalfSteps, C::kKStreams, true>(smem, kb + khi_off, khi_sh, 8 * C::kKRec,
                                                                   lbK, qb, s);
          qk_segment<C::kLB, C::kKLoW, kHalfSteps, C::kLoStreams, true>(smem, kb + klo_off, klo_sh,
                                                                        8 * C::kKRec, lbKlo, qb + kHalfSteps, s2);
        } else if constexpr (OUT) {
          qk_single<(OUT ? HB : 1), C::kOHiW, C::kOHiSteps>(smem, kb + kohi_off, kohi_sh, 8 * C::kKRec, lbKhi, qb,
                                                            qr, s);
          qk_segment<KB, C::kOLoW, C::kOLoSteps>(smem, kb + kolo_off, kolo_sh, 8 * C::kKRec, lbK,
                                                 qb + C::kOHiSteps, s2);
        } else {
          qk_segment<KB, C::kKSegW, kSteps, C::kKStreams>(smem, kb + koff, ksh, 8 * C::kKRec, lbK, qb, s, lbV);
        }

        // Softmax. s = (tok_a, head 2tq), (tok_a, 2tq + 1), (tok_a + 8, 2tq), (tok_a + 8, 2tq + 1).
        // A dead slot (past the split, or masked by the window) gets score
        // -inf and so weight exactly 0 below; its record bytes are finite (the
        // pool is zeroed at creation and only ever holds records), so no other
        // use of `dead` is needed.
        // Softcap and dead slots each behind one warp-uniform branch: most
        // tiles take neither.
        const bool full = T0 + kTileTok <= x.t1 && (T0 >= x.win_lo || T0 + kTileTok <= p.n_sinks);
        float vsc[2], vsc2[2], lv[2], ymax[2];  // vsc2: split, the lo half's V scales
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float ks = lds_half(smem, kb + kscale_off + 8 * r * C::kKRec);
          vsc[r] = lds_half(smem, vb + vscale_off + 8 * r * C::kVRec);
          if constexpr (SPLIT) {
            // The weights' reference follows the larger of the two V scales,
            // so both halves' weights stay <= 2^kLazy.
            const float ks2 = lds_half(smem, kb + kscale_lo + 8 * r * C::kKRec);
            vsc2[r] = lds_half(smem, vb + vscale_lo + 8 * r * C::kVRec);
            lv[r] = lg2(fmaxf(fmaxf(vsc[r], vsc2[r]), 0x1p-25f));
#pragma unroll
            for (int e = 0; e < 2; ++e) s[2 * r + e] = (s[2 * r + e] * ks + s2[2 * r + e] * ks2) * kmul[e];
          } else if constexpr (OUT) {  // hi and lo scores, each with its scale
            const float ks2 = lds_half(smem, kb + kscale_lo + 8 * r * C::kKRec);
            lv[r] = lg2(fmaxf(vsc[r], 0x1p-25f));
#pragma unroll
            for (int e = 0; e < 2; ++e) s[2 * r + e] = (s[2 * r + e] * ks + s2[2 * r + e] * ks2) * kmul[e];
          } else {
            // Zero vectors (s_v = 0) count with log2 s_v = -25: any finite bound works.
            lv[r] = lg2(fmaxf(vsc[r], 0x1p-25f));
#pragma unroll
            for (int e = 0; e < 2; ++e) s[2 * r + e] *= ks * kmul[e];
          }
        }
        if (p.softcap > 0.0f) {  // cap * tanh(v / cap), base 2 afterwards
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float t = ex2(s[i] * (2.0f * kLog2e / p.softcap));  // inf for large v: 1 - 0
            s[i] = p.softcap * kLog2e * (1.0f - 2.0f * rcp(t + 1.0f));
          }
        }
        if (!full) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int t = T0 + tok_a + 8 * r;
            if (!(t < x.t1 && (t < p.n_sinks || t >= x.win_lo))) s[2 * r] = s[2 * r + 1] = kNegInf;
          }
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) ymax[e] = fmaxf(s[e] + lv[0], s[2 + e] + lv[1]);  // -inf for a dead slot
        // Lazy reference: m moves only when a value exceeds it by more than
        // kLazy (then to the warp's max, found only then), so most tiles skip
        // the cross-lane max. Softmax does not depend on m; the weights stay
        // <= 2^kLazy (fp16 keeps its precision at any such scale).
        if (__any_sync(0xffffffffu, ymax[0] > m[0] + kLazy || ymax[1] > m[1] + kLazy)) {
#pragma unroll
          for (int o = 4; o <= 16; o *= 2)
#pragma unroll
            for (int e = 0; e < 2; ++e) ymax[e] = fmaxf(ymax[e], __shfl_xor_sync(0xffffffffu, ymax[e], o));
          const float mn0 = fmaxf(m[0], ymax[0]), mn1 = fmaxf(m[1], ymax[1]);
          const float c0 = mn0 > m[0] ? ex2(m[0] - mn0) : 1.0f;
          const float c1 = mn1 > m[1] ? ex2(m[1] - mn1) : 1.0f;
          l[0] *= c0;
          l[1] *= c1;
#pragma unroll
          for (int i = 0; i < kSteps; ++i) {
            acc[i][0] *= c0;
            acc[i][1] *= c1;
            acc[i][2] *= c0;
            acc[i][3] *= c1;
          }
          m[0] = mn0;
          m[1] = mn1;
          msub[0] = mn0 == kNegInf ? 0.0f : mn0;
          msub[1] = mn1 == kNegInf ? 0.0f : mn1;
        }
        float wv[4], wv2[4];
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float ee = ex2(s[2 * r + e] - msub[e]);  // <= 2^(25 + kLazy); dead: 0
            l[e] += ee;
            wv[2 * r + e] = ee * vsc[r];  // <= 2^kLazy
            if constexpr (SPLIT) wv2[2 * r + e] = ee * vsc2[r];
          }
        // P^T, the B operand of PV: transpose the two 8x8 fp16 blocks of P (rows =
        // S^T rows) so that lane (gq, tq) holds head gq at k slots 2tq, 2tq + 1.
        const uint32_t pb0 = movmatrix_trans(pack_half2(wv[0], wv[1]));
        const uint32_t pb1 = movmatrix_trans(pack_half2(wv[2], wv[3]));

        if constexpr (SPLIT) {
          // PV, split: m tiles 0 .. D/32 - 1 are dims gq*D/16 .. of the hi
          // half (weights times its V scale), the rest the lo half's.
          const uint32_t pb2 = movmatrix_trans(pack_half2(wv2[0], wv2[1]));
          const uint32_t pb3 = movmatrix_trans(pack_half2(wv2[2], wv2[3]));
          constexpr int NP = D / 128 > 0 ? D / 128 : 1;  // pair words of a half (4 m tiles each)
          // (lbK / lbKlo: side 0 of the hi / lo half's tables; side 1 through kSide1: IMM)
          constexpr bool BT = C::kByte3;
          pv_segment<KB, C::kVHiW, NP, kHalfSteps, BT, kSelPairs, true>(smem, vb + vhi_off, vhi_sh, C::kVRec,
                                                                        lbK, pb0, pb1, acc);
          pv_segment<C::kLB, C::kVLoW, NP, kHalfSteps, BT, kSelPairs, true>(smem, vb + vlo_off, vlo_sh, C::kVRec,
                                                                            lbKlo, pb2, pb3, acc + kHalfSteps);
        } else {
          // PV: lane (gq, tq) decodes dims gq*D/8 .. (gq+1)*D/8 - 1 of tokens tq + 4e + 8f
          // (k slot 2tq + e + 8f).
          // (lbK / lbV: the side-0 / side-1 bases)
          pv_segment<VB, C::kVSegW, kPW, kSteps, C::kByte3, kSelPairs>(smem, vb + voff, vsh, C::kVRec, lbK, pb0,
                                                                       pb1, acc, lbV);
        }
      }  // tile j of the pair
    }

    // 5. Merge the W warp states of the item (exact), write the partial.
#pragma unroll
    for (int o = 4; o <= 16; o *= 2)
#pragma unroll
      for (int e = 0; e < 2; ++e) l[e] += __shfl_xor_sync(0xffffffffu, l[e], o);
    if (gq == 0)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (2 * tq + e < g) {
          sM[warp * kMaxGroup + 2 * tq + e] = m[e];
          sL[warp * kMaxGroup + 2 * tq + e] = l[e];
        }
    // A warp's share goes to its free stage: the one its producer fills
    // next (pstage), where no copy is in flight; the next item's first issue
    // into it comes after that item's barrier (A), when every read below is done.
    // Its lanes read that stage in the last pair: all of them are done first
    // (racecheck reports the intra-warp hazard without this).
    __syncwarp();
    const uint32_t scr_off = stage_off(pstage);
    if (lane == 0) sScr[warp] = scr_off;
    for (int h0 = 0; h0 < g; h0 += C::kCombineHeads) {
      if (h0 > 0) __syncthreads();  // the previous round's scratch reads are done
      float* scr = reinterpret_cast<float*>(smem + scr_off);
      const int ha = 2 * tq - h0, hb = 2 * tq + 1 - h0;
      const bool wa = ha >= 0 && ha < C::kCombineHeads && 2 * tq < g;
      const bool wb = hb >= 0 && hb < C::kCombineHeads && 2 * tq + 1 < g;
#pragma unroll
      for (int i = 0; i < kSteps; ++i) {
        // O^T rows gq, gq + 8 of tile i: dims d0, d0 + 1 (split: of the tile's half)
        const int d0 = SPLIT ? (i < kHalfSteps ? 0 : D / 2) + gq * (D / 16) + 2 * (i % kHalfSteps)
                             : gq * (D / 8) + 2 * i;
        if (wa) *reinterpret_cast<float2*>(scr + ha * D + d0) = make_float2(acc[i][0], acc[i][2]);
        if (wb) *reinterpret_cast<float2*>(scr + hb * D + d0) = make_float2(acc[i][1], acc[i][3]);
      }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      // These generic-proxy writes must be ordered before the bulk copy that
      // later refills this stage (async proxy).
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
      __syncthreads();  // (B) scratch, sM, sL, sScr
      if (h0 == 0) {
        if (warp < g) {  // warp h, lane w: warp w's state of head h; max and sum by shuffles
          const int h = warp;
          const float mw = lane < W ? sM[lane * kMaxGroup + h] : kNegInf;
          float mx = mw;
#pragma unroll
          for (int o = 16; o >= 1; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
          const float fw = mw == kNegInf ? 0.0f : exp2f(mw - mx);
          if (lane < W) sF[lane * kMaxGroup + h] = fw;
          float L = lane < W ? fw * sL[lane * kMaxGroup + h] : 0.0f;
#pragma unroll
          for (int o = 16; o >= 1; o /= 2) L += __shfl_xor_sync(0xffffffffu, L, o);
          if (lane == 0) {
            sInvL[h] = L > 0.0f ? 1.0f / L : 0.0f;
            if constexpr (!DIRECT) {
              part_lse[row0 + size_t(h) * p.n_splits] = L > 0.0f ? (mx + log2f(L)) * kLn2 : kNegInf;
            } else if (p.direct_lse != nullptr) {
              p.direct_lse[size_t(x.seq) * n_heads_q + size_t(x.hkv) * g + h] =
                  L > 0.0f ? (mx + log2f(L)) * kLn2 : kNegInf;
            }
          }
        }
        __syncthreads();  // (C) sF, sInvL
      }
      const int nh = min(C::kCombineHeads, g - h0);
      if constexpr (!DIRECT) {
        for (int idx = threadIdx.x; idx < nh * D; idx += C::kThreads) {
          const int hl = idx / D, d = idx % D, h = h0 + hl;
          float o = 0.0f;
#pragma unroll 4
          for (int w = 0; w < W; ++w)
            o += reinterpret_cast<const float*>(smem + sScr[w])[hl * D + d] * sF[w * kMaxGroup + h];
          part_o[(row0 + size_t(h) * p.n_splits) * D + d] = o * sInvL[h];
        }
      } else {
        // Head h's output element d (this item's normalised partial, as the
        // loop above writes it).
        auto combined = [&](int hl, int d, int h) {
          float o = 0.0f;
#pragma unroll 4
          for (int w = 0; w < W; ++w)
            o += reinterpret_cast<const float*>(smem + sScr[w])[hl * D + d] * sF[w * kMaxGroup + h];
          return o * sInvL[h];
        };
        // The merge of one split, done here: its partial is the output in
        // the rotated domain, so out = row_fwht(partial) * post_scale * signs
        // with decode_merge_kernel's operations in its order (stages of
        // stride < 32 by shuffles, the rest in registers after one exchange
        // through shared memory; the merge's weight 1 and sum 1 are exact),
        // and lse the partial's. Rows of D threads; warp 0's scratch stage
        // holds the exchange once every scratch read is done.
        constexpr int kIt = (C::kCombineHeads * D + C::kThreads - 1) / C::kThreads;
        static_assert(C::kThreads % D == 0, "whole rows a pass");
        float v[kIt];
#pragma unroll
        for (int k = 0; k < kIt; ++k) {
          const int idx = threadIdx.x + k * C::kThreads;
          v[k] = idx < nh * D ? combined(idx / D, idx % D, h0 + idx / D) : 0.0f;
        }
        float* xr = reinterpret_cast<float*>(smem + sScr[0]);
        __syncthreads();  // every scratch read above is done
#pragma unroll
        for (int k = 0; k < kIt; ++k) {
          const int idx = threadIdx.x + k * C::kThreads, i = idx % D;
#pragma unroll
          for (int h = 1; h < 32; h *= 2) {
            const float o = __shfl_xor_sync(0xffffffffu, v[k], h);
            v[k] = (i & h) ? o - v[k] : v[k] + o;
          }
          if (idx < nh * D) xr[idx] = v[k];
        }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // a bulk copy refills this stage later
#endif
        __syncthreads();
        const float post = p.v.post_scale;
        const size_t orow = (size_t(x.seq) * n_heads_q + size_t(x.hkv) * g + h0) * D;  // the first output element
#pragma unroll
        for (int k = 0; k < kIt; ++k) {
          const int idx = threadIdx.x + k * C::kThreads;
          if (idx < nh * D) {
            const int i = idx % D, base = idx - i;
            float gk[D / 32];
#pragma unroll
            for (int j = 0; j < D / 32; ++j) gk[j] = xr[base + (i & 31) + 32 * j];
            fwht_registers(gk);
            // gk[i >> 5] by a tree of selects on its bits (an index, or a
            // chain of compares, puts gk in local memory).
#pragma unroll
            for (int b = 1; b < D / 32; b *= 2)
#pragma unroll
              for (int j = 0; j < D / 32; j += 2 * b) gk[j] = ((i >> 5) & b) ? gk[j + b] : gk[j];
            io_store(p.direct_out, orow + idx, gk[0] * post * __ldg(p.v.signs + i), p.out_dtype);
          }
        }
      }
    }
  }
#if !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  cp_async_wait<0>();  // sm_90: every bulk copy issued was waited for by its tile
#endif
}

// ---- host side -----------------------------------------------------------------
using KernelFn = void (*)(DecodeAttentionParams, int, const float*, float*, float*, CUtensorMap, CUtensorMap,
                          int);

struct TcKernel {
  KernelFn fn = nullptr;
  int threads = 0, smem = 0, tile_tokens = 0;
};

template <int D, int KB, int VB, bool SPLIT = false, int HB = 0, int MODE = kTcPartials>
TcKernel tc_kernel() {
  using C = Cfg<D, KB, VB, SPLIT, HB>;
  return {decode_tc_kernel<D, KB, VB, SPLIT, HB, MODE>, C::kThreads, C::kSmemBytes, kPairTok * C::kWarps};
}

// The outlier-K kernels: hi segment at kOutHiBits (the -out presets' hb=6),
// lo at 3 or 4 bits, V at 4 bits, d 128 / 256.
constexpr int kOutHiBits = 6;

// The kernel's view of p: split halves (kb = vb = the hi half's bits),
// outlier K (kb: the lo segment's bits, hb: the hi one's) or neither.
struct TcBits {
  int kb, vb;
  bool split;
  int hb;
};
TcBits tc_bits(const DecodeShape& s) {
  if (s.k_outlier) return {s.k_bits, s.v_bits, false, s.k_hi_bits};
  return {s.k_bits, s.v_bits, s.split_halves, 0};
}

template <int D, int MODE>
TcKernel tc_kernel_bits(const TcBits& b) {
  if constexpr (MODE != kTcDirect)  // (split V: no direct output)
    if (b.split) return b.kb == 3 ? tc_kernel<D, 3, 3, true, 0, MODE>() : tc_kernel<D, 4, 4, true, 0, MODE>();
  if constexpr (D >= 128)
    if (b.hb > 0)
      return b.kb == 3 ? tc_kernel<D, 3, 4, false, kOutHiBits, MODE>() : tc_kernel<D, 4, 4, false, kOutHiBits, MODE>();
  if (b.kb == 3 && b.vb == 3) return tc_kernel<D, 3, 3, false, 0, MODE>();
  if (b.kb == 3 && b.vb == 4) return tc_kernel<D, 3, 4, false, 0, MODE>();
  if (b.kb == 4 && b.vb == 3) return tc_kernel<D, 4, 3, false, 0, MODE>();
  return tc_kernel<D, 4, 4, false, 0, MODE>();
}

template <int MODE>
TcKernel tc_kernel_dim(int d, const TcBits& b) {
  switch (d) {
    case 64: return tc_kernel_bits<64, MODE>(b);
    case 128: return tc_kernel_bits<128, MODE>(b);
    default: return tc_kernel_bits<256, MODE>(b);
  }
}

// The instantiation for a shape decode_tc_unsupported accepted and a mode
// (the direct and device-plan twins: same resources but registers; no direct
// output for split halves), and its index among the 22 of each mode.
constexpr int kTcKernels = 22;
TcKernel tc_kernel_for(int d, const TcBits& b, int mode = kTcPartials) {
  switch (mode) {
    case kTcDirect: TQ_ASSERT(!b.split); return tc_kernel_dim<kTcDirect>(d, b);
    case kTcDevicePlan: return tc_kernel_dim<kTcDevicePlan>(d, b);
    default: return tc_kernel_dim<kTcPartials>(d, b);
  }
}
int tc_index(int d, const TcBits& b) {
  const int di = d == 64 ? 0 : d == 128 ? 1 : 2;
  if (b.hb > 0) return 18 + (di - 1) * 2 + (b.kb - 3);
  return b.split ? 12 + di * 2 + (b.kb - 3) : di * 4 + (b.kb - 3) * 2 + (b.vb - 3);
}
int tc_slots(const DecodeAttentionParams& p);

// Resident blocks the grid may hold at once (blocks per SM x SMs), per device
// and instantiation, found once: plan and launch run every decode step, and
// host time between the caller's events counts.
constexpr int kMaxDevices = 64;
std::atomic<int> g_slots[kMaxDevices][kTcKernels];

// (twins: the kernel's direct-output and device-plan twins, whose
// shared-memory opt-in is set here too: plan and launch may run inside a
// stream capture, after a first plan outside it.)
int tc_slots(const TcKernel& k, int index, KernelFn direct, KernelFn device_plan) {
  int dev = 0;
  TQ_CUDA_CHECK(cudaGetDevice(&dev));
  std::atomic<int>* cached = dev < kMaxDevices ? &g_slots[dev][index] : nullptr;
  if (cached != nullptr && cached->load(std::memory_order_relaxed) > 0)
    return cached->load(std::memory_order_relaxed);
  int n_sm = 0, per_sm = 0;
  TQ_CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev));
  TQ_CUDA_CHECK(cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem));
  for (KernelFn twin : {direct, device_plan})
    if (twin != nullptr) TQ_CUDA_CHECK(cudaFuncSetAttribute(twin, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem));
  TQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k.fn, k.threads, k.smem));
  TQ_REQUIRE(per_sm >= 1, "GPU decode attention: the tensor-core kernel does not fit on an SM (",
             k.smem, " bytes of shared memory, ", k.threads, " threads)");
  const int slots = per_sm * n_sm;
  if (cached != nullptr) cached->store(slots, std::memory_order_relaxed);
  return slots;
}

int tc_cc_major() {
  int dev = 0, major = 0;
  TQ_CUDA_CHECK(cudaGetDevice(&dev));
  TQ_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major;
}

int tc_slots(const DecodeAttentionParams& p) {
  const TcBits b = tc_bits(decode_shape(p));
  return tc_slots(tc_kernel_for(p.k.dim, b), tc_index(p.k.dim, b),
                  b.split ? nullptr : tc_kernel_for(p.k.dim, b, kTcDirect).fn,
                  tc_kernel_for(p.k.dim, b, kTcDevicePlan).fn);
}

std::atomic<int> g_split_override{0};
std::atomic<bool> g_tensor_copies{true};
std::atomic<bool> g_direct_output{true};
std::atomic<long> g_direct_launches{0};

long round_up(long x, long m) { return (x + m - 1) / m * m; }

// The smallest split the workspace allows: at most max(reference splits,
// about two per resident block and KV head) splits per sequence.
long tc_min_split(const DecodeAttentionParams& p, int slots) {
  const long cap = long(p.max_pages_per_seq) * p.page_tokens;
  const int unit = decode_tc_tile_tokens(p.k.dim);
  const long ref = (p.max_pages_per_seq + p.split_pages - 1) / std::max(1, p.split_pages);
  const long want = std::max(ref, (2L * slots + p.n_heads_kv - 1) / p.n_heads_kv);
  return round_up(std::max<long>(unit, (cap + want - 1) / want), unit);
}

// ---- the pool as tensors (sm_90 tensor copies) -------------------------------
// A region (K or V) of every page as a 4-d tensor [page][region][8-record
// chunk][8 records as u64 words]; a box {record_bytes, 4, n, 1} is the 32
// records of a tile pair. With K and V records of one size the K map spans
// both regions (n = 2: the pair's K run, then its V run, as a stage holds
// them) and the V map is unused; otherwise each map has one region (n = 1).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*,
                                   CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                                   CUtensorMapFloatOOBfill);

EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    TQ_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found));
#else  // toolkits before 12.5 have only the unversioned query
    TQ_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found));
#endif
    TQ_REQUIRE(found == cudaDriverEntryPointSuccess && f != nullptr,
               "GPU decode attention: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

void encode_region(CUtensorMap& out, const DecodeAttentionParams& p, size_t offset, size_t rec, int regions) {
  const size_t region = size_t(p.n_heads_kv) * size_t(p.page_tokens) * rec;
  const cuuint64_t dims[4] = {rec, cuuint64_t(p.n_heads_kv) * cuuint64_t(p.page_tokens) / 8, cuuint64_t(regions),
                              p.pool_pages};
  const cuuint64_t strides[3] = {8 * rec, region, p.page_bytes};  // bytes, dims 1..3
  const cuuint32_t box[4] = {cuuint32_t(rec), kPairTok / 8, cuuint32_t(regions), 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUresult r = encode_tiled()(&out, CU_TENSOR_MAP_DATA_TYPE_UINT64, 4, const_cast<uint8_t*>(p.pool) + offset,
                                    dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                    CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TQ_REQUIRE(r == CUDA_SUCCESS, "GPU decode attention: cuTensorMapEncodeTiled failed (CUresult ", int(r),
             ") for a pool of ", p.pool_pages, " pages of ", p.page_bytes, " bytes, records of ", rec, " bytes");
}

// Encodes p's pool into tmk / tmv; false where p does not describe one (no
// page count, or a layout the copy engine cannot express), and then the
// kernel moves pairs by plain bulk copies. Launches run every decode step and
// host time between the caller's events counts, so maps are kept per thread
// for the last pools seen.
bool pool_tensor_maps(const DecodeAttentionParams& p, CUtensorMap& tmk, CUtensorMap& tmv) {
  const size_t rk = size_t(p.k.record_bytes), rv = size_t(p.v.record_bytes);
  const size_t region_k = size_t(p.n_heads_kv) * size_t(p.page_tokens) * rk;
  const size_t region_v = size_t(p.n_heads_kv) * size_t(p.page_tokens) * rv;
  if (p.pool_pages == 0 || rk % 2 != 0 || rv % 2 != 0 || rk > 256 || rv > 256 || p.page_tokens % 8 != 0 ||
      p.v_region_offset != region_k || p.page_bytes < region_k + region_v || p.page_bytes % 16 != 0 ||
      region_k % 16 != 0 || region_v % 16 != 0 || reinterpret_cast<uintptr_t>(p.pool) % 16 != 0)
    return false;
  struct Key {
    const uint8_t* pool = nullptr;
    size_t pages = 0, page_bytes = 0, rk = 0, rv = 0;
    int page_tokens = 0, heads = 0;
    bool operator==(const Key&) const = default;
  };
  // A model has a pool per layer and attends them in turn: keep the maps of
  // the last kCached pools (round-robin replacement).
  constexpr int kCached = 64;
  struct Entry {
    Key key;
    CUtensorMap k, v;
  };
  thread_local Entry cache[kCached];
  thread_local int next_slot = 0;
  const Key key{p.pool, p.pool_pages, p.page_bytes, rk, rv, p.page_tokens, p.n_heads_kv};
  for (const Entry& e : cache)
    if (e.key.pool != nullptr && e.key == key) {
      tmk = e.k;
      tmv = e.v;
      return true;
    }
  Entry& e = cache[next_slot];
  next_slot = (next_slot + 1) % kCached;
  if (rk == rv) {
    encode_region(e.k, p, 0, rk, 2);
    e.v = e.k;
  } else {
    encode_region(e.k, p, 0, rk, 1);
    encode_region(e.v, p, p.v_region_offset, rv, 1);
  }
  e.key = key;
  tmk = e.k;
  tmv = e.v;
  return true;
}

}  // namespace

const char* decode_tc_unsupported(const DecodeShape& s) {
  if (s.head_dim != 64 && s.head_dim != 128 && s.head_dim != 256)
    return "head_dim is not 64, 128 or 256";
  if ((s.k_split || s.v_split) && !s.split_halves && !s.k_outlier)
    return "channel-split formats other than K and V of one format in two halves of head_dim/2 channels "
           "(turbo2.5, turbo3.5) or outlier channels in K beside a plain V (turbo4-out, paper_mse-out: hi= of "
           "head_dim/8 channels) run on the reference kernel (f32 scales, splits in V, other hi= counts)";
  if (s.k_outlier) {
    if (s.head_dim < 128) return "outlier channels in K need head_dim 128 or 256 (head_dim/8 a multiple of 16)";
    if (s.k_hi_bits != kOutHiBits) return "outlier channels in K must have hb=6 (the kernels built)";
    if (s.v_bits != 4) return "outlier channels in K run beside a 4-bit V only";
  }
  if ((s.k_bits != 3 && s.k_bits != 4) || (s.v_bits != 3 && s.v_bits != 4))
    return "K and V codes must be 3 or 4 bits (other widths: reference kernel)";
  if (s.k_bits == 3 && s.v_bits == 3 && !s.kv_one_codebook)
    return "3-bit K and V with different codebooks (cb=): the 3-bit tables hold one codebook for both";
  if (s.k_scale_f32 || s.v_scale_f32) return "f32 scales (sf=f32) are not handled";
  if (s.group < 1 || s.group > kMaxGroup) return "GQA group is larger than 8";
  if (s.page_tokens <= 0 || s.page_tokens % kTileTok != 0)
    return "page_tokens is not a multiple of 16 (tiles of 16 tokens must not cross pages)";
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return "no CUDA device";
  }
  int major = 0, smem = 0;
  TQ_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TQ_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (major < 8) return "the device has no mma.sync f16 (compute capability < 8.0)";
  if (smem < tc_kernel_for(s.head_dim, tc_bits(s)).smem)
    return "the device has too little shared memory per block for the tables and stages";
  return nullptr;
}

void set_decode_tc_split_override(int split_tokens) { g_split_override = split_tokens; }
void set_decode_tc_tensor_copies(bool enabled) { g_tensor_copies = enabled; }
void set_decode_tc_direct_output(bool enabled) { g_direct_output = enabled; }
long decode_tc_direct_launches() { return g_direct_launches.load(std::memory_order_relaxed); }

namespace {
// A window of at most this many tokens a warp (5 tile pairs) may be one
// split with the output written by the decode kernel, where the split cost
// model below says so.
constexpr long kDirectTokensPerWarp = 5 * kPairTok;
// What the merge kernel costs, in the split cost model's unit (a block's
// tile row: one pair a warp): ~3 us of launch and latency chain (eighteenth
// session) against ~2.3 us a pair-round of a lone block (twenty-sixth
// session: one split over a 1024-token window took Gemma 8 warps 4-5 pair
// rounds and 6.4 us more than 8 splits and the merge; Llama's 16 warps 2-3
// rounds and 0.4 us more at batch 1, 1.0 us less at batch 8, where the
// splits already ran 2 rounds).
constexpr double kMergeUnits = 1.3;
// Whether p can take the direct output: V one rotation (the merge's
// row_fwht), no dense tokens (the merge joins them), and a window (the splits
// then cover window + 31 tokens at any length).
bool direct_possible(const DecodeAttentionParams& p) {
  return p.v_split.n_seg == 0 &&
         p.dense.prefix_slots + p.dense.window_slots == 0 &&
         decode_split_span_cap(p) < long(p.max_pages_per_seq) * p.page_tokens;
}
}  // namespace

int decode_tc_tile_tokens(int head_dim) { return kPairTok * warps_for(head_dim); }

int decode_tc_max_splits(const DecodeAttentionParams& p) {
  const long cap = long(p.max_pages_per_seq) * p.page_tokens;
  const long s_min = tc_min_split(p, tc_slots(p));
  return int((cap + s_min - 1) / s_min);
}

namespace {
// The shortest split a plan of p may take: tc_min_split (the workspace's
// bound), shorter for a window.
long plan_min_split(const DecodeAttentionParams& p, int slots, long unit) {
  long s_min = tc_min_split(p, slots);
  // A window's splits may be shorter: the workspace holds as many partials
  // as the whole capacity would need at s_min.
  if (const long span = decode_split_span_cap(p); span < long(p.max_pages_per_seq) * p.page_tokens) {
    const long most = decode_tc_max_splits(p);
    s_min = std::min(s_min, std::max(unit, round_up((span + most - 1) / most, unit)));
  }
  return s_min;
}

// The cost model's choice (decode_split_cost over decode_split_candidate),
// as the device plan computes it; l_max: the longest span.
long best_split(const DecodeAttentionParams& p, const int* host_lengths, long s_min, int slots, long unit,
                long& l_max, long long& best_cost) {
  // The tokens the splits of each sequence cover (from its window's start).
  auto span = [&](int s) {
    return long(host_lengths[s]) - decode_split_start(host_lengths[s], p.window, p.window_tail, p.n_sinks);
  };
  l_max = 0;
  for (int s = 0; s < p.n_seqs; ++s) l_max = std::max(l_max, span(s));
  const int rows_min = int(s_min / unit);
  const int n_cand = decode_split_candidates(rows_min, int(l_max), int(unit));
  long best = s_min;
  best_cost = LLONG_MAX;
  for (int i = 0; i < n_cand; ++i) {
    const long split = long(decode_split_candidate(i, rows_min)) * unit;
    long items = 0;
    for (int s = 0; s < p.n_seqs; ++s) items += (span(s) + split - 1) / split;
    const long long cost = decode_split_cost(items * p.n_heads_kv, slots, split, unit);
    if (cost <= best_cost) {  // ties: the longer split (fewer partials for the merge)
      best_cost = cost;
      best = split;
    }
  }
  return best;
}
}  // namespace

int decode_tc_device_plan_min_split(const DecodeAttentionParams& p) {
  if (g_split_override.load(std::memory_order_relaxed) > 0) return 0;  // a pinned split: the host plans
  return int(plan_min_split(p, tc_slots(p), decode_tc_tile_tokens(p.k.dim)));
}

// Tokens per split: the cost model's choice for the current lengths
// (best_split: rounds x (split + one row of overhead), rounds = items over
// resident blocks), or one split a window with the output written directly
// where that is no dearer.
int decode_tc_split_tokens(const DecodeAttentionParams& p, const int* host_lengths) {
  const int slots = tc_slots(p);
  const long unit = decode_tc_tile_tokens(p.k.dim);
  const long s_min = plan_min_split(p, slots, unit);
  if (const int forced = g_split_override.load(std::memory_order_relaxed); forced > 0)
    return int(std::max(s_min, round_up(forced, unit)));
  long l_max = 0;
  long long best_cost = 0;
  const long best = best_split(p, host_lengths, s_min, slots, unit, l_max, best_cost);
  // One split a sequence over the whole window, the output written by the
  // decode kernel (launch_decode_attention_tc): no merge kernel, where that
  // saves more than the longer splits cost.
  if (const long cap = decode_split_span_cap(p);
      direct_possible(p) && cap <= kDirectTokensPerWarp * warps_for(p.k.dim)) {
    const long items = long(p.n_seqs) * p.n_heads_kv;
    const double cost = double((items + slots - 1) / slots) * double(round_up(std::max(l_max, 1L), unit) + unit);
    if (cost <= double(best_cost) + kMergeUnits * double(unit)) return int(round_up(cap, unit));
  }
  return int(best);
}

void launch_decode_attention_tc(const DecodeAttentionParams& plan, const float* q, float* partial_o,
                                float* partial_lse, void* out, float* lse, CUstream_st* stream) {
  if (plan.n_seqs == 0) return;
  TQ_ASSERT(plan.kernel == DecodeKernel::tensor_core && plan.split_tokens > 0 &&
            plan.split_tokens % decode_tc_tile_tokens(plan.k.dim) == 0);
  DecodeAttentionParams p = plan;
  // A device plan's split count is not known here: its launch always ends
  // with the merge, and its grid is every resident block (the kernel plans
  // n_items itself).
  const bool device_plan = p.device_plan != nullptr;
  p.direct = !device_plan && p.n_splits == 1 && p.dense_o == nullptr && direct_possible(p) &&
                     g_direct_output.load(std::memory_order_relaxed)
                 ? 1
                 : 0;
  if (p.direct) g_direct_launches.fetch_add(1, std::memory_order_relaxed);
  p.direct_out = out;
  p.direct_lse = lse;
  const TcBits b = tc_bits(decode_shape(p));
  const TcKernel k = tc_kernel_for(p.k.dim, b, device_plan ? kTcDevicePlan : p.direct ? kTcDirect : kTcPartials);
  const int n_items = device_plan ? 0 : p.n_splits * p.n_seqs * p.n_heads_kv;
  const int grid = device_plan ? tc_slots(p) : std::min(n_items, tc_slots(p));
  const bool sm90 = tc_cc_major() == 9;
  CUtensorMap tmk{}, tmv{};
  const bool tensor_copy =
      sm90 && g_tensor_copies.load(std::memory_order_relaxed) && pool_tensor_maps(p, tmk, tmv);
  // After the widening of a 16-bit query (launch_decode_attention), as its
  // programmatic dependent: the prologue overlaps that kernel.
  if (p.q_dtype != int(DType::f32))
    launch_maybe_dependent_smem(k.fn, dim3(grid), dim3(k.threads), size_t(k.smem), stream, sm90, p, n_items, q,
                                partial_o, partial_lse, tmk, tmv, tensor_copy ? 1 : 0);
  else
    k.fn<<<grid, k.threads, k.smem, stream>>>(p, n_items, q, partial_o, partial_lse, tmk, tmv, tensor_copy ? 1 : 0);
  TQ_CUDA_CHECK_LAUNCH();
  // Overlap only on sm_90 and only where the dependent kernels were compiled
  // with their wait (launch_maybe_dependent checks: JIT-compiled compute_80
  // code on an H200 has no trigger and no wait, and then runs plainly). The
  // dense tokens' part, if any, sits between the two: it needs nothing of
  // this kernel, so it runs on the SMs this one leaves free.
  const bool overlap = sm90;
  if (p.direct) return;  // the kernel wrote out / lse
  if (p.dense_o != nullptr) launch_decode_dense_part(p, q, stream, overlap);
  launch_decode_merge(p, partial_o, partial_lse, out, lse, stream, overlap);
}

}  // namespace tq::cuda
