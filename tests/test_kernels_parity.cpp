// Parity of every compiled SIMD kernel table with the scalar reference
// (kernels_ref), bit for bit: floats are compared with memcmp, codes and
// packed bytes exactly. Every case runs on every level this CPU and build
// offer (tq::available_simd_levels()); a failure names the level and the case.
//
// Buffers are allocated to their exact size (so AddressSanitizer catches any
// read or write past them) and each case also runs on pointers misaligned by
// one element. Random data comes from a printed seed; TQ_TEST_SEED overrides it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/kernels.hpp"
#include "test_util.hpp"
#include "turboquant/rng.hpp"
#include "turboquant/simd.hpp"

namespace tq::kernels {
namespace {

using tq::test::kAwkwardLengths;

uint64_t test_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("TQ_TEST_SEED");
    const uint64_t s = env && *env ? std::strtoull(env, nullptr, 0) : 20250611ull;
    std::printf("test_kernels_parity: seed %llu (set TQ_TEST_SEED to change)\n",
                static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

// The SIMD tables to check; skips the test when only the scalar path exists.
std::vector<const Kernels*> simd_tables() {
  std::vector<const Kernels*> out;
  for (SimdLevel level : available_simd_levels())
    if (level != SimdLevel::scalar) out.push_back(&kernels_for(level));
  return out;
}

#define TQ_FOR_EACH_SIMD_LEVEL(k)                                                      \
  const std::vector<const Kernels*> tables_ = simd_tables();                           \
  if (tables_.empty()) GTEST_SKIP() << "only the scalar path exists on this CPU/build"; \
  for (const Kernels* k : tables_)

// Lengths: the shared awkward list plus the vector-width edges.
std::vector<int> lengths() {
  std::vector<int> n = kAwkwardLengths;
  for (int extra : {3, 7, 8, 9, 15, 16, 17, 24, 32, 48, 64, 128, 1000}) n.push_back(extra);
  return n;
}

constexpr int kOffsets[] = {0, 1};  // as allocated, then shifted by one element (misaligned)

// An exactly sized buffer viewed from an offset: [pad of `off`][n elements].
template <class T>
struct Buf {
  Buf(size_t n, int off) : store(n + off), off(off), n(n) {}
  T* data() { return store.data() + off; }
  const T* data() const { return store.data() + off; }
  T& operator[](size_t i) { return data()[i]; }
  std::vector<T> store;
  int off;
  size_t n;
};

template <class T>
Buf<T> buf_from(const std::vector<T>& v, int off) {
  Buf<T> b(v.size(), off);
  std::copy(v.begin(), v.end(), b.data());
  return b;
}

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

::testing::AssertionResult same_floats(const float* got, const float* want, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(got + i, want + i, sizeof(float)) != 0)
      return ::testing::AssertionFailure()
             << "element " << i << " of " << n << ": got " << got[i] << " (0x" << std::hex
             << bits_of(got[i]) << "), reference " << std::dec << want[i] << " (0x" << std::hex
             << bits_of(want[i]) << std::dec << ")";
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult same_float(float got, float want) { return same_floats(&got, &want, 1); }

::testing::AssertionResult same_bytes(const uint8_t* got, const uint8_t* want, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (got[i] != want[i])
      return ::testing::AssertionFailure() << "byte " << i << " of " << n << ": got "
                                           << int(got[i]) << ", reference " << int(want[i]);
  return ::testing::AssertionSuccess();
}

// Codes from quantize; a mismatch also names the input and the scaled value.
::testing::AssertionResult same_codes(const uint8_t* got, const uint8_t* want, size_t n,
                                      const float* x, float mul) {
  for (size_t i = 0; i < n; ++i)
    if (got[i] != want[i])
      return ::testing::AssertionFailure()
             << "code " << i << " of " << n << ": got " << int(got[i]) << ", reference "
             << int(want[i]) << " for x = " << x[i] << " (x * mul = " << x[i] * mul << ")";
  return ::testing::AssertionSuccess();
}

std::string label(const Kernels& k) { return "level " + to_string(k.level); }

std::vector<uint8_t> random_codes(size_t n, int bits, uint64_t seed) {
  Rng rng(seed);
  std::vector<uint8_t> c(n);
  for (auto& v : c) v = static_cast<uint8_t>(rng.below(uint64_t{1} << bits));
  return c;
}

// ---- the table itself ----------------------------------------------------------

TEST(KernelsParity, TablesAreComplete) {
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    SCOPED_TRACE(label(*k));
    EXPECT_TRUE(k->sum_squares && k->dot && k->scale && k->mul_signs && k->fwht && k->matvec &&
                k->quantize && k->dequantize && k->pack && k->unpack);
    std::printf("  checking %s\n", to_string(k->level).c_str());
  }
}

// ---- reductions ------------------------------------------------------------------

TEST(KernelsParity, SumSquaresAndDot) {
  const Kernels& ref = kernels_ref();
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    std::vector<int> ns = lengths();
    ns.push_back(0);
    for (int n : ns)
      for (int off : kOffsets) {
        SCOPED_TRACE(label(*k) + ", n " + std::to_string(n) + ", offset " + std::to_string(off));
        const auto a = buf_from(tq::test::random_gaussian(n, derive_seed(test_seed(), n)), off);
        const auto b = buf_from(tq::test::random_gaussian(n, derive_seed(test_seed(), n + 7919)), off);
        EXPECT_TRUE(same_float(k->sum_squares(a.data(), n), ref.sum_squares(a.data(), n)))
            << "sum_squares";
        EXPECT_TRUE(same_float(k->dot(a.data(), b.data(), n), ref.dot(a.data(), b.data(), n)))
            << "dot";
      }
  }
}

// Large values of mixed sign make the rounding of each partial sum matter, so a
// different summation order would show.
TEST(KernelsParity, DotOrderSensitiveData) {
  const Kernels& ref = kernels_ref();
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    for (int n : {17, 31, 100, 257}) {
      SCOPED_TRACE(label(*k) + ", n " + std::to_string(n));
      Rng rng(derive_seed(test_seed(), "order"));
      std::vector<float> a(n), b(n);
      for (int i = 0; i < n; ++i) {
        a[i] = static_cast<float>(std::ldexp(rng.gaussian(), static_cast<int>(rng.below(40)) - 20));
        b[i] = static_cast<float>(rng.gaussian());
      }
      EXPECT_TRUE(same_float(k->dot(a.data(), b.data(), n), ref.dot(a.data(), b.data(), n)));
      EXPECT_TRUE(same_float(k->sum_squares(a.data(), n), ref.sum_squares(a.data(), n)));
    }
  }
}

// ---- elementwise -------------------------------------------------------------------

TEST(KernelsParity, ScaleAndMulSigns) {
  const Kernels& ref = kernels_ref();
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    for (int n : lengths())
      for (int off : kOffsets) {
        SCOPED_TRACE(label(*k) + ", n " + std::to_string(n) + ", offset " + std::to_string(off));
        const auto x = tq::test::random_gaussian(n, derive_seed(test_seed(), n));
        Rng rng(derive_seed(test_seed(), "signs"));
        std::vector<float> signs(n);
        for (auto& s : signs) s = rng.below(2) ? 1.0f : -1.0f;

        auto got = buf_from(x, off), want = buf_from(x, off);
        k->scale(got.data(), n, 0.0883883476f);
        ref.scale(want.data(), n, 0.0883883476f);
        EXPECT_TRUE(same_floats(got.data(), want.data(), n)) << "scale";

        const auto sg = buf_from(signs, off);
        got = buf_from(x, off);
        want = buf_from(x, off);
        k->mul_signs(got.data(), sg.data(), n);
        ref.mul_signs(want.data(), sg.data(), n);
        EXPECT_TRUE(same_floats(got.data(), want.data(), n)) << "mul_signs";
      }
  }
}

// ---- fwht ------------------------------------------------------------------------

TEST(KernelsParity, Fwht) {
  const Kernels& ref = kernels_ref();
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    for (int n : {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096})
      for (int off : kOffsets)
        for (float post : {1.0f, 1.0f / std::sqrt(static_cast<float>(n)), -0.3f}) {
          SCOPED_TRACE(label(*k) + ", n " + std::to_string(n) + ", offset " +
                       std::to_string(off) + ", post_scale " + std::to_string(post));
          const auto x = tq::test::random_gaussian(n, derive_seed(test_seed(), n));
          auto got = buf_from(x, off), want = buf_from(x, off);
          k->fwht(got.data(), n, post);
          ref.fwht(want.data(), n, post);
          EXPECT_TRUE(same_floats(got.data(), want.data(), n));
        }
  }
}

// ---- matvec ----------------------------------------------------------------------

TEST(KernelsParity, Matvec) {
  const Kernels& ref = kernels_ref();
  std::vector<std::pair<int, int>> shapes;  // (rows, cols)
  for (int r : {64, 96, 128, 256, 80})
    for (int c : {64, 96, 128, 256, 80}) shapes.emplace_back(r, c);
  for (int r : kAwkwardLengths) shapes.emplace_back(r, 33);
  for (int c : kAwkwardLengths) shapes.emplace_back(40, c);
  shapes.emplace_back(7, 1);
  shapes.emplace_back(200, 3);
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    for (auto [rows, cols] : shapes)
      for (int off : kOffsets) {
        SCOPED_TRACE(label(*k) + ", rows " + std::to_string(rows) + ", cols " +
                     std::to_string(cols) + ", offset " + std::to_string(off));
        const uint64_t s = derive_seed(test_seed(), rows * 1000 + cols);
        const auto m = buf_from(tq::test::random_gaussian(size_t(rows) * cols, s), off);
        const auto x = buf_from(tq::test::random_gaussian(cols, s + 1), off);
        Buf<float> got(rows, off), want(rows, off);
        std::fill(got.store.begin(), got.store.end(), 123.0f);  // must be overwritten
        k->matvec(m.data(), x.data(), got.data(), rows, cols);
        ref.matvec(m.data(), x.data(), want.data(), rows, cols);
        EXPECT_TRUE(same_floats(got.data(), want.data(), rows));
      }
  }
}

// ---- quantize / dequantize -----------------------------------------------------------

// Sorted boundaries for `bits`; with `dupes`, some repeat (still ascending).
std::vector<float> make_boundaries(int bits, uint64_t seed, bool dupes) {
  std::vector<float> b = tq::test::random_gaussian((size_t(1) << bits) - 1, seed);
  for (auto& v : b) v *= 0.25f;
  std::sort(b.begin(), b.end());
  if (dupes)
    for (size_t i = 1; i < b.size(); i += 3) b[i] = b[i - 1];
  return b;
}

// Random values, values exactly on (and one ulp beside) each boundary once
// multiplied by `mul`, NaN, infinities and signed zeros, shuffled.
std::vector<float> quantize_inputs(int n, const std::vector<float>& bounds, float mul, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> x(n);
  const float inv = 1.0f / mul;  // mul is a power of two: v = x * mul is exact
  for (int i = 0; i < n; ++i) {
    const float bk = bounds[rng.below(bounds.size())];
    switch (rng.below(8)) {
      case 0: x[i] = bk * inv; break;
      case 1: x[i] = std::nextafter(bk, 1e30f) * inv; break;
      case 2: x[i] = std::nextafter(bk, -1e30f) * inv; break;
      case 3: {
        const float special[] = {std::numeric_limits<float>::quiet_NaN(),
                                 -std::numeric_limits<float>::quiet_NaN(),
                                 std::numeric_limits<float>::infinity(),
                                 -std::numeric_limits<float>::infinity(), 0.0f, -0.0f};
        x[i] = special[rng.below(6)];
        break;
      }
      default: x[i] = static_cast<float>(rng.gaussian() * 0.4) * inv; break;
    }
  }
  return x;
}

TEST(KernelsParity, Quantize) {
  const Kernels& ref = kernels_ref();
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    for (int bits = 1; bits <= 8; ++bits)
      for (bool dupes : {false, true})
        for (float mul : {1.0f, 2.0f, 0.125f}) {
          const auto bounds = make_boundaries(bits, derive_seed(test_seed(), bits), dupes);
          for (int n : lengths())
            for (int off : kOffsets) {
              SCOPED_TRACE(label(*k) + ", bits " + std::to_string(bits) + ", n " +
                           std::to_string(n) + ", offset " + std::to_string(off) + ", mul " +
                           std::to_string(mul) + (dupes ? ", repeated boundaries" : ""));
              const auto b = buf_from(bounds, off);
              const auto x = buf_from(quantize_inputs(n, bounds, mul, derive_seed(test_seed(), n * 8 + bits)), off);
              Buf<uint8_t> got(n, off), want(n, off);
              k->quantize(x.data(), n, mul, b.data(), bits, got.data());
              ref.quantize(x.data(), n, mul, b.data(), bits, want.data());
              ASSERT_TRUE(same_codes(got.data(), want.data(), n, x.data(), mul));
            }
        }
  }
}

// NaN always maps to code 0 (it compares false against every boundary).
TEST(KernelsParity, QuantizeNanIsZero) {
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    for (int bits = 1; bits <= 8; ++bits) {
      SCOPED_TRACE(label(*k) + ", bits " + std::to_string(bits));
      const auto bounds = make_boundaries(bits, derive_seed(test_seed(), bits), false);
      const std::vector<float> x(37, std::numeric_limits<float>::quiet_NaN());
      std::vector<uint8_t> codes(x.size(), 0xAB);
      k->quantize(x.data(), static_cast<int>(x.size()), 1.0f, bounds.data(), bits, codes.data());
      for (uint8_t c : codes) ASSERT_EQ(c, 0);
    }
  }
}

TEST(KernelsParity, Dequantize) {
  const Kernels& ref = kernels_ref();
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    for (int bits = 1; bits <= 8; ++bits) {
      const auto cents = tq::test::random_gaussian(size_t(1) << bits, derive_seed(test_seed(), 100 + bits));
      for (int n : lengths())
        for (int off : kOffsets) {
          SCOPED_TRACE(label(*k) + ", bits " + std::to_string(bits) + ", n " + std::to_string(n) +
                       ", offset " + std::to_string(off));
          const auto c = buf_from(cents, off);
          const auto codes = buf_from(random_codes(n, bits, derive_seed(test_seed(), n * 8 + bits)), off);
          Buf<float> got(n, off), want(n, off);
          k->dequantize(codes.data(), n, c.data(), bits, got.data());
          ref.dequantize(codes.data(), n, c.data(), bits, want.data());
          ASSERT_TRUE(same_floats(got.data(), want.data(), n));
        }
    }
  }
}

// ---- pack / unpack -------------------------------------------------------------------

std::vector<int> pack_lengths() {
  std::vector<int> n = lengths();
  for (int extra : {1, 5, 63, 65, 96, 127, 129, 255, 256, 300}) n.push_back(extra);
  return n;
}

TEST(KernelsParity, PackUnpack) {
  const Kernels& ref = kernels_ref();
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    for (int bits = 1; bits <= 8; ++bits)
      for (int n : pack_lengths())
        for (int off : kOffsets) {
          SCOPED_TRACE(label(*k) + ", bits " + std::to_string(bits) + ", n " + std::to_string(n) +
                       ", offset " + std::to_string(off));
          const size_t n_bytes = (size_t(n) * bits + 7) / 8;
          const auto codes = buf_from(random_codes(n, bits, derive_seed(test_seed(), n * 8 + bits)), off);

          Buf<uint8_t> got(n_bytes, off), want(n_bytes, off);
          std::fill(got.store.begin(), got.store.end(), 0xA5);  // must be fully overwritten
          k->pack(codes.data(), n, bits, got.data());
          ref.pack(codes.data(), n, bits, want.data());
          ASSERT_TRUE(same_bytes(got.data(), want.data(), n_bytes)) << "pack";

          Buf<uint8_t> back(n, off), back_ref(n, off);
          k->unpack(want.data(), n, bits, back.data());
          ASSERT_TRUE(same_bytes(back.data(), codes.data(), n)) << "unpack(pack(codes))";

          // Arbitrary bytes, padding bits included: unpack must ignore them
          // exactly as the reference does.
          Rng rng(derive_seed(test_seed(), "stream"));
          Buf<uint8_t> stream(n_bytes, off);
          for (size_t i = 0; i < n_bytes; ++i) stream[i] = static_cast<uint8_t>(rng.next_u64());
          k->unpack(stream.data(), n, bits, back.data());
          ref.unpack(stream.data(), n, bits, back_ref.data());
          ASSERT_TRUE(same_bytes(back.data(), back_ref.data(), n)) << "unpack(random bytes)";
        }
  }
}

// Every length up to a few SIMD blocks, so each tail and group boundary of
// the pack/unpack and quantize/dequantize loops is hit.
TEST(KernelsParity, EveryShortLength) {
  const Kernels& ref = kernels_ref();
  TQ_FOR_EACH_SIMD_LEVEL(k) {
    for (int bits = 1; bits <= 8; ++bits) {
      const auto bounds = make_boundaries(bits, derive_seed(test_seed(), bits), false);
      const auto cents = tq::test::random_gaussian(size_t(1) << bits, derive_seed(test_seed(), 100 + bits));
      for (int n = 1; n <= 200; ++n) {
        SCOPED_TRACE(label(*k) + ", bits " + std::to_string(bits) + ", n " + std::to_string(n));
        const size_t n_bytes = (size_t(n) * bits + 7) / 8;
        const auto codes = random_codes(n, bits, derive_seed(test_seed(), n * 8 + bits));
        std::vector<uint8_t> got(n_bytes), want(n_bytes);
        k->pack(codes.data(), n, bits, got.data());
        ref.pack(codes.data(), n, bits, want.data());
        ASSERT_TRUE(same_bytes(got.data(), want.data(), n_bytes)) << "pack";
        std::vector<uint8_t> back(n);
        k->unpack(want.data(), n, bits, back.data());
        ASSERT_TRUE(same_bytes(back.data(), codes.data(), n)) << "unpack";

        const auto x = quantize_inputs(n, bounds, 1.0f, derive_seed(test_seed(), n));
        std::vector<uint8_t> q(n), q_ref(n);
        k->quantize(x.data(), n, 1.0f, bounds.data(), bits, q.data());
        ref.quantize(x.data(), n, 1.0f, bounds.data(), bits, q_ref.data());
        ASSERT_TRUE(same_codes(q.data(), q_ref.data(), n, x.data(), 1.0f)) << "quantize";
        std::vector<float> d(n), d_ref(n);
        k->dequantize(codes.data(), n, cents.data(), bits, d.data());
        ref.dequantize(codes.data(), n, cents.data(), bits, d_ref.data());
        ASSERT_TRUE(same_floats(d.data(), d_ref.data(), n)) << "dequantize";
      }
    }
  }
}

}  // namespace
}  // namespace tq::kernels
