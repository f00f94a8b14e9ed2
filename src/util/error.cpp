#include "turboquant/error.hpp"

#include <cstdio>
#include <cstdlib>

namespace tq::detail {

[[noreturn]] void assert_fail(const char* expr, const char* file, int line) {
  std::fprintf(stderr, "turboquant: internal error: %s failed at %s:%d\n", expr, file, line);
  std::abort();
}

}  // namespace tq::detail
