#include "turboquant/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace tq {
namespace {

// Workers wait for a job; a job is a counter of indices that every
// participating thread pulls from until exhausted.
class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  void run(size_t n, int threads, const std::function<void(size_t)>& fn) {
    std::lock_guard<std::mutex> job_lock(job_mutex_);  // one job at a time
    const int helpers = std::min<int>(threads - 1, static_cast<int>(n) - 1);
    ensure_workers(helpers);
    std::exception_ptr error;
    std::mutex error_mutex;
    std::atomic<size_t> next{0};
    auto body = [&] {
      for (;;) {
        const size_t i = next.fetch_add(1);
        if (i >= n) return;
        try {
          fn(i);
        } catch (...) {
          std::lock_guard<std::mutex> g(error_mutex);
          if (!error) error = std::current_exception();
          next.store(n);
        }
      }
    };
    {
      std::lock_guard<std::mutex> g(mutex_);
      task_ = body;
      active_ = helpers;
      remaining_ = helpers;
      ++generation_;
    }
    cv_.notify_all();
    body();
    std::unique_lock<std::mutex> lk(mutex_);
    done_cv_.wait(lk, [&] { return remaining_ == 0; });
    task_ = nullptr;
    if (error) std::rethrow_exception(error);
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> g(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

 private:
  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lk(mutex_);
        cv_.wait(lk, [&] { return stop_ || (generation_ != seen && id < active_); });
        if (stop_) return;
        seen = generation_;
        task = task_;
      }
      task();
      {
        std::lock_guard<std::mutex> g(mutex_);
        if (--remaining_ == 0) done_cv_.notify_one();
      }
    }
  }

  std::mutex job_mutex_, mutex_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  std::function<void()> task_;
  int active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace

int hardware_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

void parallel_for(size_t n, int threads, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  if (threads <= 0) threads = hardware_threads();
  if (threads == 1 || n == 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  Pool::get().run(n, threads, fn);
}

}  // namespace tq
