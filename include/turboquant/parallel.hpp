// A small persistent thread pool for the CPU kernels: parallel_for(n, threads,
// fn) runs fn(i) for i in [0, n) on up to `threads` threads (the caller's
// thread included) and returns when all are done. Exceptions propagate (the
// first one is rethrown in the caller).
//
//   tq::parallel_for(n_heads, 8, [&](size_t h) { work(h); });
#pragma once

#include <cstddef>
#include <functional>

namespace tq {

// threads <= 0: all hardware threads.
void parallel_for(size_t n, int threads, const std::function<void(size_t)>& fn);
int hardware_threads();

}  // namespace tq
