// Products with quantized weights (kernels/qmatmul.hpp): fused decode +
// multiply-add kernels read each weight row once per group of 4 tokens, and
// rows are split across threads in tasks of whole rows.
#include <algorithm>

#include "kernels/qmatmul.hpp"
#include "turboquant/error.hpp"
#include "turboquant/model.hpp"
#include "turboquant/parallel.hpp"
#include "turboquant/simd.hpp"

namespace tq {

void matmul(const Weight& w, const float* x, int n, float* y, int threads) {
  TQ_ASSERT(w.data && w.rows > 0 && w.cols > 0 && n >= 0);
  if (n == 0) return;
  // The level is read at call time so tests (tq::set_simd_level) and TQ_SIMD
  // take effect; picking the kernel is a switch, negligible next to the product.
  const kernels::QMatmulFn fn = kernels::qmatmul_pick(simd_level(), w.type, w.cols);
  // Tasks: about 8 per thread (balance when a thread is descheduled), at least
  // 16 rows each (the call overhead stays small next to decoding a row) and at
  // most 128 (a task's rows stay in L2 while each group of 4 tokens passes over
  // them); a multiple of 4, the AVX-512 tile height.
  const int n_threads = threads > 0 ? threads : hardware_threads();
  int rows_per_task = w.rows / std::max(1, 8 * n_threads);
  rows_per_task = std::clamp((rows_per_task + 3) / 4 * 4, 16, 128);
  const size_t n_tasks = (size_t(w.rows) + rows_per_task - 1) / rows_per_task;
  auto run = [&](size_t task) {
    const int r0 = int(task) * rows_per_task, r1 = std::min(w.rows, r0 + rows_per_task);
    fn(w.data + size_t(r0) * w.row_bytes, w.row_bytes, r1 - r0, w.cols, x, n, y + r0,
       size_t(w.rows));
  };
  if (n_tasks == 1 || n_threads == 1) {
    for (size_t task = 0; task < n_tasks; ++task) run(task);
    return;
  }
  parallel_for(n_tasks, threads, run);
}

}  // namespace tq
