// Internal: the element types of decode attention's query and output
// (DecodeAttentionParams::q_dtype / out_dtype, values of tq::cuda::DType).
// A bf16 or f16 model hands attend its query and takes its output in its own
// type: the merge (or a direct output) writes out in it, and a 16-bit query
// is widened by one small kernel (convert_query_kernel), so an engine needs
// no conversion kernels of its own around the call.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>

#include "turboquant/cuda.hpp"

namespace tq::cuda {

// Element i of a query array of type dtype, as fp32 (exact: f16 and bf16
// values are fp32 values).
__device__ __forceinline__ float io_load(const void* base, size_t i, int dtype) {
  if (dtype == int(DType::f32)) return __ldg(static_cast<const float*>(base) + i);
  const unsigned short u = __ldg(static_cast<const unsigned short*>(base) + i);
  return dtype == int(DType::bf16) ? __uint_as_float(unsigned(u) << 16) : __half2float(__ushort_as_half(u));
}

// Stores v as element i of an output array of type dtype (round to nearest
// even, as tq::float_to_half / float_to_bf16 on the host).
__device__ __forceinline__ void io_store(void* base, size_t i, float v, int dtype) {
  if (dtype == int(DType::f32))
    static_cast<float*>(base)[i] = v;
  else if (dtype == int(DType::bf16))
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  else
    static_cast<__half*>(base)[i] = __float2half_rn(v);
}

}  // namespace tq::cuda
