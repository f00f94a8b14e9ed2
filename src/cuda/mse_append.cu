// Quantize-append for tq-mse records, bit-identical to the CPU encoder
// (MseQuantizer::encode_one over kernels_ref.cpp):
//   norm   = sqrtf(sum x_i^2), 16 lane partial sums (element i -> lane i % 16,
//            index order) then the tree w = 8, 4, 2, 1: lane[i] += lane[i + w];
//   y      = x * signs; FWHT stages h = 1, 2, 4, ..., each output one a+b or
//            a-b; then y_i *= 1/sqrt(dim) (a separate rounding);
//   code_i = #{k : boundaries[k] < y_i * (1 / norm)} by the same branch-free
//            binary search; packed little-endian; scale = fp16(norm), RNE
//            (by integer arithmetic, as src/util/half.cpp).
// Every float operation is an explicit round-to-nearest intrinsic and this
// file is compiled with -fmad=false: nvcc must not fuse or reorder anything
// here, or a code near a boundary flips.
//
// One warp per vector; the vector lives in shared memory for the FWHT.
#include <cuda_runtime.h>

#include "cuda/cuda_check.hpp"
#include "cuda/kernels.hpp"

namespace tq::cuda {
namespace {

constexpr int kWarps = 4;     // vectors per block
constexpr int kMaxDim = 256;

// fp32 -> binary16 bits, round to nearest even: src/util/half.cpp in integer
// arithmetic, so the stored bits cannot depend on the device's conversion
// instruction. (A first version stored the bytes of __float2half_rn(x) and on
// the H200, CUDA 13.0, the low byte came out as trunc(x) while the PTX looked
// right; cause not established.)
__device__ unsigned float_to_half_bits(float f) {
  const unsigned x = __float_as_uint(f);
  const unsigned sign = (x >> 16) & 0x8000u;
  const unsigned abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u)  // inf or NaN
    return abs > 0x7f800000u ? (sign | 0x7e00u | ((abs >> 13) & 0x3ffu)) : (sign | 0x7c00u);
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                         // subnormal half or zero
    if (abs < 0x33000000u) return sign;
    const unsigned exp = abs >> 23;
    const unsigned mant = (abs & 0x7fffffu) | 0x800000u;
    const unsigned shift = 126 - exp;
    const unsigned half_mant = mant >> shift;
    const unsigned rem = mant & ((1u << shift) - 1);
    const unsigned halfway = 1u << (shift - 1);
    unsigned r = half_mant;
    if (rem > halfway || (rem == halfway && (half_mant & 1u))) ++r;
    return sign | r;
  }
  unsigned h = (abs - 0x38000000u) >> 13;
  const unsigned rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | h;
}

__global__ void __launch_bounds__(kWarps * 32)
    mse_append_kernel(const float* __restrict__ x, int n_rows, const int* __restrict__ dst,
                      MseDeviceFormat f, PagedRegion r, int* status) {
  __shared__ float xs_all[kWarps][kMaxDim];
  __shared__ unsigned char codes_all[kWarps][kMaxDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.x * kWarps + warp;  // row = token * n_heads + head
  if (row >= n_rows) return;                   // whole warps leave together
  const int d = f.dim;
  float* xs = xs_all[warp];
  unsigned char* codes = codes_all[warp];
  const float* xr = x + size_t(row) * d;
  for (int i = lane; i < d; i += 32) xs[i] = xr[i];
  __syncwarp();

  // Norm in the canonical order: lanes 0..15 hold the 16 partial sums.
  float part = 0.0f;
  if (lane < 16)
    for (int i = lane; i < d; i += 16) part = __fadd_rn(part, __fmul_rn(xs[i], xs[i]));
  for (int w = 8; w >= 1; w /= 2) {
    const float other = __shfl_down_sync(0xffffffffu, part, w);
    if (lane < w) part = __fadd_rn(part, other);
  }
  const float ss = __shfl_sync(0xffffffffu, part, 0);
  const bool finite = isfinite(ss);
  const float norm = __fsqrt_rn(ss);

  // Rotation: signs, then the FWHT stage by stage, then the 1/sqrt(d) scale.
  for (int i = lane; i < d; i += 32) xs[i] = __fmul_rn(xs[i], f.signs[i]);
  __syncwarp();
  for (int h = 1; h < d; h *= 2) {
    for (int p = lane; p < d / 2; p += 32) {
      const int j = (p / h) * 2 * h + p % h;
      const float a = xs[j], b = xs[j + h];
      xs[j] = __fadd_rn(a, b);
      xs[j + h] = __fsub_rn(a, b);
    }
    __syncwarp();
  }
  const int n_bounds = (1 << f.bits) - 1;
  if (finite && norm != 0.0f) {
    const float mul = __fdiv_rn(1.0f, norm);
    for (int i = lane; i < d; i += 32) {
      const float y = __fmul_rn(xs[i], f.post_scale);
      const float v = __fmul_rn(y, mul);
      int lo = 0;
      for (int step = (n_bounds + 1) / 2; step >= 1; step /= 2)
        if (f.boundaries[lo + step - 1] < v) lo += step;
      codes[i] = static_cast<unsigned char>(lo);
    }
  } else {  // zero vector: codes 0, scale 0 (a non-finite one is refused below)
    for (int i = lane; i < d; i += 32) codes[i] = 0;
  }
  __syncwarp();

  const int token = row / r.n_heads, head = row % r.n_heads;
  const int page = dst[2 * token], slot = dst[2 * token + 1];
  uint8_t* rec = r.pool + size_t(page) * r.page_bytes + r.region_offset +
                 (size_t(head) * r.page_tokens + slot) * f.record_bytes;
  // Pack: byte b holds stream bits [8b, 8b + 8); stream bit k is bit k % bits
  // of code k / bits.
  for (int b = lane; b < f.code_bytes; b += 32) {
    unsigned v = 0;
    for (int k = 0; k < 8; ++k) {
      const int bit = 8 * b + k;
      const int ci = bit / f.bits;
      if (ci < d) v |= ((codes[ci] >> (bit % f.bits)) & 1u) << k;
    }
    rec[b] = static_cast<uint8_t>(v);
  }
  if (lane == 0) {
    uint8_t* sp = rec + f.code_bytes;
    if (!finite) atomicOr(status, kStatusNonFinite);
    if (f.scale_f32) {
      const unsigned u = __float_as_uint(norm);
      for (int i = 0; i < 4; ++i) sp[i] = static_cast<uint8_t>(u >> (8 * i));
    } else {
      if (!(norm <= 65504.0f) && finite) atomicOr(status, kStatusScaleOverflow);
      const unsigned h = float_to_half_bits(norm);
      sp[0] = static_cast<uint8_t>(h & 0xffu);
      sp[1] = static_cast<uint8_t>(h >> 8);
    }
  }
}

}  // namespace

void launch_mse_append(const float* x, int n_tokens, const int* dst, const MseDeviceFormat& f,
                       const PagedRegion& r, int* status, CUstream_st* stream) {
  const int n_rows = n_tokens * r.n_heads;
  if (n_rows == 0) return;
  const int blocks = (n_rows + kWarps - 1) / kWarps;
  mse_append_kernel<<<blocks, kWarps * 32, 0, stream>>>(x, n_rows, dst, f, r, status);
  TQ_CUDA_CHECK_LAUNCH();
}

}  // namespace tq::cuda
