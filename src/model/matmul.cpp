// Products with quantized weights: each weight row is decoded once into a
// per-thread buffer and dotted with every token's activations (prefill
// batches amortise the decode). Rows are split across threads.
#include <algorithm>
#include <vector>

#include "kernels/kernels.hpp"
#include "turboquant/error.hpp"
#include "turboquant/model.hpp"
#include "turboquant/parallel.hpp"

namespace tq {

void matmul(const Weight& w, const float* x, int n, float* y, int threads) {
  TQ_ASSERT(w.data && w.rows > 0 && w.cols > 0);
  const auto& k = kernels::kernels_active();
  constexpr int kRowsPerTask = 32;
  const size_t n_tasks = (size_t(w.rows) + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(n_tasks, threads, [&](size_t task) {
    thread_local std::vector<float> row;
    if (row.size() < size_t(w.cols)) row.resize(w.cols);
    const int r0 = int(task) * kRowsPerTask, r1 = std::min(w.rows, r0 + kRowsPerTask);
    for (int r = r0; r < r1; ++r) {
      ggml::dequantize_row(w.type, w.data + size_t(r) * w.row_bytes, w.cols, row.data());
      for (int t = 0; t < n; ++t) y[size_t(t) * w.rows + r] = k.dot(row.data(), x + size_t(t) * w.cols, w.cols);
    }
  });
}

}  // namespace tq
