// Errors, in two tiers (see docs/architecture.md):
//  - tq::Error: bad input from a caller (a flag, a spec string, a shape, a
//    file). The message names the bad value, what was expected, and where.
//  - TQ_ASSERT: a broken internal invariant; aborts with file and line.
//
//   TQ_REQUIRE(bits >= 1 && bits <= 8, "bits must be 1..8, got ", bits);
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace tq {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
[[noreturn]] void assert_fail(const char* expr, const char* file, int line);
}  // namespace detail

}  // namespace tq

#define TQ_THROW(...) throw ::tq::Error(::tq::detail::concat(__VA_ARGS__))
#define TQ_REQUIRE(cond, ...)   \
  do {                          \
    if (!(cond)) TQ_THROW(__VA_ARGS__); \
  } while (0)
#define TQ_ASSERT(cond)                                                   \
  do {                                                                    \
    if (!(cond)) ::tq::detail::assert_fail(#cond, __FILE__, __LINE__);    \
  } while (0)
#ifdef NDEBUG
#define TQ_DASSERT(cond) ((void)0)
#else
#define TQ_DASSERT(cond) TQ_ASSERT(cond)
#endif
