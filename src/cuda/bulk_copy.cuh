// Internal: sm_90 bulk copies (global -> shared) completing on an mbarrier
// with a transaction count: one lane starts a copy of a whole run (16-byte
// multiples), the other lanes only wait. Used by the tensor-core decode
// kernel and by the read floor of tq gpu-bench (bench_util.cu).
//
// Defined only in the sm_90+ device pass: the instructions do not exist
// below sm_90, and every caller guards its use the same way.
#pragma once

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
namespace tq::cuda::bulk {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the (generic proxy) initialisation visible to the copy engine.
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// bytes (a multiple of 16) from gsrc (16-byte aligned) to shared address sdst.
__device__ __forceinline__ void copy_g2s(uint32_t sdst, const void* gsrc, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(sdst),
      "l"(gsrc), "r"(bytes), "r"(bar)
      : "memory");
}
// One tile-mode tensor copy of a 4-d box (tensor map in param / const /
// global memory; coordinates in elements, innermost first) to shared address
// sdst (128-byte aligned), completing on mbarrier `bar`.
__device__ __forceinline__ void tensor_g2s_4d(uint32_t sdst, const void* tmap, int c0, int c1, int c2, int c3,
                                              uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(sdst),
      "l"(tmap), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
// Spins until the mbarrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t ok;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!ok);
}

}  // namespace tq::cuda::bulk
#endif
