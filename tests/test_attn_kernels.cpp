// Every compiled attention-on-records kernel table (attn_kernels.hpp) against
// the scalar reference, within floating-point tolerance: SIMD paths reorder
// sums and fuse multiply-adds, so each output must satisfy
//   |simd - ref| <= 1e-5 * (sum of |terms|) + tiny,
// where the sum of |terms| is computed alongside the reference.
//
// Cases: g in {1,2,3,4,8}, d in {16,64,96,128,256} (+ 40, 8 for the fallback),
// n in {1,2,31,33,257}, bits 1..8, fp16 and f32 scales, record strides equal
// to the record size (odd, so records are misaligned) and padded; every dense
// kind. Buffers are exactly sized, so AddressSanitizer catches overreads.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "kernels/attn_kernels.hpp"
#include "turboquant/half.hpp"
#include "turboquant/rng.hpp"
#include "turboquant/simd.hpp"

namespace tq::kernels {
namespace {

uint64_t test_seed() {
  const char* env = std::getenv("TQ_TEST_SEED");
  return env && *env ? std::strtoull(env, nullptr, 0) : 20250611ull;
}

std::vector<const AttnKernels*> simd_tables() {
  std::vector<const AttnKernels*> out;
  for (SimdLevel level : available_simd_levels())
    if (level != SimdLevel::scalar) out.push_back(&attn_kernels_for(level));
  // The AVX-512 decoders without VBMI, when the default table uses VBMI.
  if (const AttnKernels* k = attn_kernels_avx512_no_vbmi(); k && k != attn_kernels_avx512())
    out.push_back(k);
  return out;
}

constexpr double kRtol = 1e-5;

std::vector<float> gaussian(Rng& rng, size_t n) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(rng.gaussian());
  return v;
}

size_t packed(int d, int bits) { return (size_t(d) * bits + 7) / 8; }

// Pack codes into the tight little-endian bitstream of format.hpp.
void pack_codes(const std::vector<unsigned>& codes, int bits, uint8_t* out) {
  std::memset(out, 0, packed(static_cast<int>(codes.size()), bits));
  for (size_t i = 0; i < codes.size(); ++i)
    for (int b = 0; b < bits; ++b)
      if ((codes[i] >> b) & 1u) out[(i * bits + b) / 8] |= static_cast<uint8_t>(1u << ((i * bits + b) % 8));
}

struct CodeRecs {
  std::vector<uint8_t> buf;  // exactly n * stride bytes (last record exactly sized)
  std::vector<std::vector<float>> dec;  // decoded values (without scale), per record
  std::vector<float> scale;
  size_t stride = 0, scale_off = 0;
};

CodeRecs make_code_recs(Rng& rng, int d, size_t n, int bits, bool scale_f32, size_t pad,
                        const std::vector<float>& cent) {
  CodeRecs r;
  r.scale_off = packed(d, bits);
  const size_t rec_bytes = r.scale_off + (scale_f32 ? 4 : 2);
  r.stride = rec_bytes + pad;
  r.buf.assign((n - 1) * r.stride + rec_bytes, 0xA5);
  r.dec.resize(n);
  r.scale.resize(n);
  for (size_t j = 0; j < n; ++j) {
    std::vector<unsigned> codes(d);
    r.dec[j].resize(d);
    for (int i = 0; i < d; ++i) {
      codes[i] = static_cast<unsigned>(rng.uniform() * (1 << bits)) & ((1u << bits) - 1);
      r.dec[j][i] = cent[codes[i]];
    }
    uint8_t* rec = r.buf.data() + j * r.stride;
    pack_codes(codes, bits, rec);
    float s = static_cast<float>(0.5 + rng.uniform() * 2.0);
    if (scale_f32) {
      std::memcpy(rec + r.scale_off, &s, 4);
    } else {
      const uint16_t h = float_to_half(s);
      rec[r.scale_off] = static_cast<uint8_t>(h);
      rec[r.scale_off + 1] = static_cast<uint8_t>(h >> 8);
      s = half_to_float(h);
    }
    r.scale[j] = s;
  }
  return r;
}

// Tolerances: the sum of |terms| of each output.
std::vector<double> score_mag(const std::vector<float>& q, int g, int d,
                              const std::vector<std::vector<float>>& x, const std::vector<float>& sc) {
  const size_t n = x.size();
  std::vector<double> m(size_t(g) * n);
  for (int h = 0; h < g; ++h)
    for (size_t j = 0; j < n; ++j) {
      double s = 0;
      for (int i = 0; i < d; ++i) s += std::fabs(double(q[size_t(h) * d + i]) * x[j][i]);
      m[h * n + j] = s * std::fabs(sc.empty() ? 1.0 : sc[j]);
    }
  return m;
}

std::vector<double> acc_mag(const std::vector<float>& w, const std::vector<float>& acc0, int g,
                            int d, const std::vector<std::vector<float>>& x,
                            const std::vector<float>& sc) {
  const size_t n = x.size();
  std::vector<double> m(size_t(g) * d);
  for (int h = 0; h < g; ++h)
    for (int i = 0; i < d; ++i) {
      double s = std::fabs(acc0[size_t(h) * d + i]);
      for (size_t j = 0; j < n; ++j)
        s += std::fabs(double(w[h * n + j]) * (sc.empty() ? 1.0 : sc[j]) * x[j][i]);
      m[size_t(h) * d + i] = s;
    }
  return m;
}

::testing::AssertionResult all_close(const std::vector<float>& got, const std::vector<float>& ref,
                                     const std::vector<double>& mag) {
  for (size_t i = 0; i < ref.size(); ++i) {
    const double tol = kRtol * mag[i] + 1e-30;
    if (!(std::fabs(double(got[i]) - ref[i]) <= tol))
      return ::testing::AssertionFailure()
             << "index " << i << ": got " << got[i] << ", ref " << ref[i] << ", tol " << tol;
  }
  return ::testing::AssertionSuccess();
}

const std::vector<int> kG = {1, 2, 3, 4, 8};
const std::vector<int> kD = {16, 64, 96, 128, 256, 40, 8};
const std::vector<size_t> kN = {1, 2, 31, 33, 257};

TEST(AttnKernels, RefMatchesDirectDefinition) {
  // The reference itself against a double-precision evaluation of the contract.
  Rng rng(test_seed());
  const int g = 2, d = 24, bits = 3;
  const size_t n = 5;
  const std::vector<float> cent = gaussian(rng, 1 << bits);
  const CodeRecs r = make_code_recs(rng, d, n, bits, false, 1, cent);
  const std::vector<float> q = gaussian(rng, size_t(g) * d);
  std::vector<float> s(g * n);
  attn_kernels_ref().score_codes(q.data(), g, d, r.buf.data(), r.stride, n, bits, cent.data(),
                                 r.scale_off, false, s.data());
  for (int h = 0; h < g; ++h)
    for (size_t j = 0; j < n; ++j) {
      double e = 0;
      for (int i = 0; i < d; ++i) e += double(q[h * d + i]) * r.dec[j][i];
      EXPECT_NEAR(s[h * n + j], e * r.scale[j], 1e-5 * (1 + std::fabs(e)));
    }
}

TEST(AttnKernels, CodesMatchReference) {
  const auto tables = simd_tables();
  if (tables.empty()) GTEST_SKIP() << "only the scalar path exists on this CPU/build";
  Rng rng(test_seed() + 1);
  for (int bits = 1; bits <= 8; ++bits)
    for (int d : kD)
      for (size_t n : kN)
        for (int variant = 0; variant < 2; ++variant) {
          const bool scale_f32 = variant == 1;
          const size_t pad = variant == 0 ? 0 : 3;  // f16: stride = record size
          const int g = kG[(bits + d + n) % kG.size()];
          const std::vector<float> cent = gaussian(rng, size_t(1) << bits);
          const CodeRecs r = make_code_recs(rng, d, n, bits, scale_f32, pad, cent);
          const std::vector<float> q = gaussian(rng, size_t(g) * d);
          const std::vector<float> w = gaussian(rng, size_t(g) * n);
          const std::vector<float> acc0 = gaussian(rng, size_t(g) * d);
          std::vector<float> sref(g * n), aref = acc0;
          const AttnKernels& ref = attn_kernels_ref();
          ref.score_codes(q.data(), g, d, r.buf.data(), r.stride, n, bits, cent.data(),
                          r.scale_off, scale_f32, sref.data());
          ref.accumulate_codes(w.data(), g, d, r.buf.data(), r.stride, n, bits, cent.data(),
                               r.scale_off, scale_f32, aref.data());
          const auto smag = score_mag(q, g, d, r.dec, r.scale);
          const auto amag = acc_mag(w, acc0, g, d, r.dec, r.scale);
          for (const AttnKernels* k : tables) {
            const std::string where = "level " + to_string(k->level) + " bits " +
                                      std::to_string(bits) + " d " + std::to_string(d) + " n " +
                                      std::to_string(n) + " g " + std::to_string(g) +
                                      (scale_f32 ? " f32 scale" : " f16 scale");
            std::vector<float> s(g * n, -1.0f), a = acc0;
            k->score_codes(q.data(), g, d, r.buf.data(), r.stride, n, bits, cent.data(),
                           r.scale_off, scale_f32, s.data());
            k->accumulate_codes(w.data(), g, d, r.buf.data(), r.stride, n, bits, cent.data(),
                                r.scale_off, scale_f32, a.data());
            EXPECT_TRUE(all_close(s, sref, smag)) << "score_codes, " << where;
            EXPECT_TRUE(all_close(a, aref, amag)) << "accumulate_codes, " << where;
          }
        }
}

TEST(AttnKernels, AllGroupSizesMatchReference) {
  const auto tables = simd_tables();
  if (tables.empty()) GTEST_SKIP() << "only the scalar path exists on this CPU/build";
  Rng rng(test_seed() + 2);
  for (int bits : {2, 3, 4})
    for (int g = 1; g <= 9; ++g)
      for (int d : {64, 128}) {
        const size_t n = 37;
        const std::vector<float> cent = gaussian(rng, size_t(1) << bits);
        const CodeRecs r = make_code_recs(rng, d, n, bits, false, 0, cent);
        const std::vector<float> q = gaussian(rng, size_t(g) * d);
        const std::vector<float> w = gaussian(rng, size_t(g) * n);
        const std::vector<float> acc0(size_t(g) * d, 0.0f);
        std::vector<float> sref(g * n), aref = acc0;
        attn_kernels_ref().score_codes(q.data(), g, d, r.buf.data(), r.stride, n, bits,
                                       cent.data(), r.scale_off, false, sref.data());
        attn_kernels_ref().accumulate_codes(w.data(), g, d, r.buf.data(), r.stride, n, bits,
                                            cent.data(), r.scale_off, false, aref.data());
        const auto smag = score_mag(q, g, d, r.dec, r.scale);
        const auto amag = acc_mag(w, acc0, g, d, r.dec, r.scale);
        for (const AttnKernels* k : tables) {
          std::vector<float> s(g * n), a = acc0;
          k->score_codes(q.data(), g, d, r.buf.data(), r.stride, n, bits, cent.data(),
                         r.scale_off, false, s.data());
          k->accumulate_codes(w.data(), g, d, r.buf.data(), r.stride, n, bits, cent.data(),
                              r.scale_off, false, a.data());
          EXPECT_TRUE(all_close(s, sref, smag)) << to_string(k->level) << " g " << g << " d " << d;
          EXPECT_TRUE(all_close(a, aref, amag)) << to_string(k->level) << " g " << g << " d " << d;
        }
      }
}

TEST(AttnKernels, DenseMatchesReference) {
  const auto tables = simd_tables();
  if (tables.empty()) GTEST_SKIP() << "only the scalar path exists on this CPU/build";
  Rng rng(test_seed() + 3);
  for (int kind = 0; kind < 3; ++kind)
    for (int d : kD)
      for (size_t n : kN)
        for (size_t pad : {size_t(0), size_t(1)}) {  // pad 1: odd, misaligned stride
          const int g = kG[(kind + d + n + pad) % kG.size()];
          const size_t esz = kind == 0 ? 4 : 2;
          const size_t rec_bytes = esz * d, stride = rec_bytes + pad;
          std::vector<uint8_t> buf((n - 1) * stride + rec_bytes);
          std::vector<std::vector<float>> x(n, std::vector<float>(d));
          for (size_t j = 0; j < n; ++j)
            for (int i = 0; i < d; ++i) {
              float v = static_cast<float>(rng.gaussian());
              uint8_t* p = buf.data() + j * stride + esz * i;
              if (kind == 0) {
                std::memcpy(p, &v, 4);
              } else {
                const uint16_t h = kind == 1 ? float_to_half(v) : float_to_bf16(v);
                p[0] = static_cast<uint8_t>(h);
                p[1] = static_cast<uint8_t>(h >> 8);
                v = kind == 1 ? half_to_float(h) : bf16_to_float(h);
              }
              x[j][i] = v;
            }
          const std::vector<float> q = gaussian(rng, size_t(g) * d);
          const std::vector<float> w = gaussian(rng, size_t(g) * n);
          const std::vector<float> acc0 = gaussian(rng, size_t(g) * d);
          std::vector<float> sref(g * n), aref = acc0;
          attn_kernels_ref().score_dense(kind, q.data(), g, d, buf.data(), stride, n, sref.data());
          attn_kernels_ref().accumulate_dense(kind, w.data(), g, d, buf.data(), stride, n,
                                              aref.data());
          // The reference itself against the decoded values.
          for (int h = 0; h < g; ++h) {
            double e = 0;
            for (int i = 0; i < d; ++i) e += double(q[h * d + i]) * x[0][i];
            EXPECT_NEAR(sref[h * n], e, 1e-5 * (1 + std::fabs(e)));
          }
          const auto smag = score_mag(q, g, d, x, {});
          const auto amag = acc_mag(w, acc0, g, d, x, {});
          for (const AttnKernels* k : tables) {
            const std::string where = "level " + to_string(k->level) + " kind " +
                                      std::to_string(kind) + " d " + std::to_string(d) + " n " +
                                      std::to_string(n) + " g " + std::to_string(g) + " pad " +
                                      std::to_string(pad);
            std::vector<float> s(g * n, -1.0f), a = acc0;
            k->score_dense(kind, q.data(), g, d, buf.data(), stride, n, s.data());
            k->accumulate_dense(kind, w.data(), g, d, buf.data(), stride, n, a.data());
            EXPECT_TRUE(all_close(s, sref, smag)) << "score_dense, " << where;
            EXPECT_TRUE(all_close(a, aref, amag)) << "accumulate_dense, " << where;
          }
        }
}

// q8_0 / q4_0 blocks: random fp16 scales and random payload bytes (every
// int8 / nibble value), against the reference and the decoded values.
TEST(AttnKernels, BlocksMatchReference) {
  Rng rng(test_seed() + 5);
  for (int kind = 0; kind < 2; ++kind)
    for (int d : {32, 64, 96, 128, 256})
      for (size_t n : kN)
        for (size_t pad : {size_t(0), size_t(1)}) {
          const int g = kG[(kind + d / 32 + n + pad) % kG.size()];
          const size_t bb = kind == 0 ? 34 : 18, rec_bytes = bb * (d / 32), stride = rec_bytes + pad;
          std::vector<uint8_t> buf((n - 1) * stride + rec_bytes);
          std::vector<std::vector<float>> x(n, std::vector<float>(d));
          for (size_t j = 0; j < n; ++j)
            for (int b = 0; b < d / 32; ++b) {
              uint8_t* blk = buf.data() + j * stride + b * bb;
              const uint16_t h = float_to_half(static_cast<float>(rng.gaussian() * 0.05));
              blk[0] = static_cast<uint8_t>(h);
              blk[1] = static_cast<uint8_t>(h >> 8);
              for (size_t i = 2; i < bb; ++i) blk[i] = static_cast<uint8_t>(rng.uniform() * 256);
              const float sc = half_to_float(h);
              for (int i = 0; i < 32; ++i) {
                const int v = kind == 0 ? static_cast<int8_t>(blk[2 + i])
                                        : (i < 16 ? (blk[2 + i] & 15) : (blk[2 + i - 16] >> 4)) - 8;
                x[j][b * 32 + i] = static_cast<float>(v) * sc;
              }
            }
          const std::vector<float> q = gaussian(rng, size_t(g) * d);
          const std::vector<float> w = gaussian(rng, size_t(g) * n);
          const std::vector<float> acc0 = gaussian(rng, size_t(g) * d);
          std::vector<float> sref(g * n), aref = acc0;
          attn_kernels_ref().score_blocks(kind, q.data(), g, d, buf.data(), stride, n, sref.data());
          attn_kernels_ref().accumulate_blocks(kind, w.data(), g, d, buf.data(), stride, n,
                                               aref.data());
          const auto smag = score_mag(q, g, d, x, {});
          const auto amag = acc_mag(w, acc0, g, d, x, {});
          // The reference against the decoded values.
          std::vector<float> sdir(g * n);
          for (int h = 0; h < g; ++h)
            for (size_t j = 0; j < n; ++j) {
              double e = 0;
              for (int i = 0; i < d; ++i) e += double(q[h * d + i]) * x[j][i];
              sdir[h * n + j] = static_cast<float>(e);
            }
          EXPECT_TRUE(all_close(sref, sdir, smag)) << "score_blocks ref, kind " << kind;
          for (const AttnKernels* k : simd_tables()) {
            if (!k->score_blocks) continue;
            const std::string where = "level " + to_string(k->level) + " kind " +
                                      std::to_string(kind) + " d " + std::to_string(d) + " n " +
                                      std::to_string(n) + " g " + std::to_string(g) + " pad " +
                                      std::to_string(pad);
            std::vector<float> s(g * n, -1.0f), a = acc0;
            k->score_blocks(kind, q.data(), g, d, buf.data(), stride, n, s.data());
            k->accumulate_blocks(kind, w.data(), g, d, buf.data(), stride, n, a.data());
            EXPECT_TRUE(all_close(s, sref, smag)) << "score_blocks, " << where;
            EXPECT_TRUE(all_close(a, aref, amag)) << "accumulate_blocks, " << where;
          }
        }
}

// Sign sketches: random bits, a norm after them (fp16 / f32), odd strides.
TEST(AttnKernels, SignsMatchReference) {
  Rng rng(test_seed() + 6);
  for (int m : {16, 64, 128, 256, 40})
    for (size_t n : kN)
      for (int variant = 0; variant < 2; ++variant) {
        const bool f32 = variant == 1;
        const int g = kG[(m + n + variant) % kG.size()];
        const size_t sign_off = 3, norm_off = sign_off + (m + 7) / 8;
        const size_t rec_bytes = norm_off + (f32 ? 4 : 2), stride = rec_bytes + variant;
        std::vector<uint8_t> buf((n - 1) * stride + rec_bytes);
        for (auto& b : buf) b = static_cast<uint8_t>(rng.uniform() * 256);
        std::vector<std::vector<float>> x(n, std::vector<float>(m));
        std::vector<float> norm(n);
        const float factor = 0.37f;
        for (size_t j = 0; j < n; ++j) {
          uint8_t* rec = buf.data() + j * stride;
          float v = static_cast<float>(0.5 + rng.uniform());
          if (f32) {
            std::memcpy(rec + norm_off, &v, 4);
          } else {
            const uint16_t h = float_to_half(v);
            rec[norm_off] = static_cast<uint8_t>(h);
            rec[norm_off + 1] = static_cast<uint8_t>(h >> 8);
            v = half_to_float(h);
          }
          norm[j] = factor * v;
          for (int i = 0; i < m; ++i) x[j][i] = (rec[sign_off + i / 8] >> (i % 8)) & 1 ? 1.0f : -1.0f;
        }
        const std::vector<float> q = gaussian(rng, size_t(g) * m);
        const std::vector<float> w = gaussian(rng, size_t(g) * n);
        const std::vector<float> acc0 = gaussian(rng, size_t(g) * m);
        std::vector<float> sref(g * n), aref = acc0;
        attn_kernels_ref().score_signs(q.data(), g, m, buf.data(), stride, n, sign_off, factor,
                                       norm_off, f32, sref.data());
        attn_kernels_ref().accumulate_signs(w.data(), g, m, buf.data(), stride, n, sign_off, factor,
                                            norm_off, f32, aref.data());
        const auto smag = score_mag(q, g, m, x, norm);
        const auto amag = acc_mag(w, acc0, g, m, x, norm);
        std::vector<float> sdir(g * n);
        for (int h = 0; h < g; ++h)
          for (size_t j = 0; j < n; ++j) {
            double e = 0;
            for (int i = 0; i < m; ++i) e += double(q[h * m + i]) * x[j][i];
            sdir[h * n + j] = static_cast<float>(e * norm[j]);
          }
        EXPECT_TRUE(all_close(sref, sdir, smag)) << "score_signs ref, m " << m;
        for (const AttnKernels* k : simd_tables()) {
          if (!k->score_signs) continue;
          const std::string where = "level " + to_string(k->level) + " m " + std::to_string(m) +
                                    " n " + std::to_string(n) + " g " + std::to_string(g) +
                                    (f32 ? " f32" : " f16");
          std::vector<float> s(g * n, -1.0f), a = acc0;
          k->score_signs(q.data(), g, m, buf.data(), stride, n, sign_off, factor, norm_off, f32,
                         s.data());
          k->accumulate_signs(w.data(), g, m, buf.data(), stride, n, sign_off, factor, norm_off,
                              f32, a.data());
          EXPECT_TRUE(all_close(s, sref, smag)) << "score_signs, " << where;
          EXPECT_TRUE(all_close(a, aref, amag)) << "accumulate_signs, " << where;
        }
      }
}

// softmax_chunk: SIMD exp against libm's. The exp argument s * scale - m is
// formed with one rounding (FMA) or two, so weights may differ by an ulp of
// the argument's terms on top of the polynomial's < 1e-6 relative error.
TEST(AttnKernels, SoftmaxChunkMatchesReference) {
  const auto tables = simd_tables();
  if (tables.empty()) GTEST_SKIP() << "only the scalar path exists on this CPU/build";
  Rng rng(test_seed() + 4);
  for (int g : kG)
    for (size_t n : {size_t(1), size_t(2), size_t(15), size_t(16), size_t(17), size_t(31),
                     size_t(33), size_t(256), size_t(257)})
      for (int start = 0; start < 3; ++start) {  // m_old: -inf, below the chunk, above it
        const float scale = static_cast<float>(0.05 + rng.uniform());
        std::vector<float> s0(size_t(g) * n);
        for (auto& x : s0) x = static_cast<float>(rng.gaussian() * 8.0);
        std::vector<float> m0(g), l0(g);
        for (int h = 0; h < g; ++h) {
          m0[h] = start == 0 ? -INFINITY : static_cast<float>(start == 1 ? -40.0 : 40.0);
          l0[h] = start == 0 ? 0.0f : static_cast<float>(1.0 + rng.uniform());
        }
        std::vector<float> sref = s0, mref = m0, lref = l0, cref(g);
        attn_kernels_ref().softmax_chunk(sref.data(), g, n, scale, mref.data(), lref.data(),
                                         cref.data());
        for (const AttnKernels* k : tables) {
          const std::string where = "level " + to_string(k->level) + " g " + std::to_string(g) +
                                    " n " + std::to_string(n) + " start " + std::to_string(start);
          std::vector<float> s = s0, m = m0, l = l0, c(g, -1.0f);
          k->softmax_chunk(s.data(), g, n, scale, m.data(), l.data(), c.data());
          for (int h = 0; h < g; ++h) {
            EXPECT_EQ(m[h], mref[h]) << where;
            if (start == 0)
              EXPECT_EQ(c[h], 0.0f) << where;  // nothing seen yet: the accumulator is dropped
            else
              EXPECT_NEAR(c[h], cref[h], 2e-6 * cref[h] * (1.0 + std::fabs(m0[h] - mref[h])) + 1e-37)
                  << where;
            EXPECT_NEAR(l[h], lref[h], 1e-5 * lref[h]) << where;
            for (size_t j = 0; j < n; ++j) {
              const size_t i = h * n + j;
              // an ulp of the argument's terms becomes a relative error of the weight
              const double arg = std::fabs(double(s0[i]) * scale) + std::fabs(mref[h]);
              ASSERT_NEAR(s[i], sref[i], sref[i] * (2e-6 + 1.2e-7 * arg) + 1e-37)
                  << where << " j " << j << " score " << s0[i];
            }
          }
        }
      }
}

// decode_polar is bit-identical across tables (each output one fp32 product).
// Random records (any code bits are valid codes; radii random finite halves
// including subnormals and zeros), random cos/sin tables, every level count
// a dim allows up to 5, angle widths 1..4 (the SIMD path) and 5 / 8 (its
// reference fallback), strides equal to the record size (odd: misaligned
// records) and padded; exactly sized buffers (AddressSanitizer: no overread).
TEST(AttnKernels, DecodePolarMatchesReferenceBitForBit) {
  Rng rng(test_seed() + 77);
  const AttnKernels& ref = attn_kernels_ref();
  ASSERT_NE(ref.decode_polar, nullptr);
  int cases = 0;
  for (int d : {16, 32, 64, 128, 256})
    for (int levels = 1; levels <= 5 && (d >> levels) >= 1; ++levels)
      for (const auto [b1, b] : {std::pair{4, 2}, std::pair{1, 1}, std::pair{3, 3}, std::pair{2, 4},
                                  std::pair{5, 2}, std::pair{4, 8}})
        for (size_t n : {size_t(1), size_t(3), size_t(33)}) {
          PolarLayout L;
          L.dim = d;
          L.levels = levels;
          size_t off = 0;
          std::vector<std::vector<float>> tabs;
          for (int l = 0; l < levels; ++l) {
            L.bits[l] = l == 0 ? b1 : b;
            L.level_offset[l] = off;
            off += packed(d >> (l + 1), L.bits[l]);
            tabs.push_back(gaussian(rng, size_t(1) << L.bits[l]));
            tabs.push_back(gaussian(rng, size_t(1) << L.bits[l]));
          }
          for (int l = 0; l < levels; ++l) {
            L.cos[l] = tabs[2 * l].data();
            L.sin[l] = tabs[2 * l + 1].data();
          }
          L.radii_offset = off;
          const size_t rec_bytes = off + 2 * size_t(d >> levels);
          for (size_t stride : {rec_bytes, rec_bytes + 5}) {
            std::vector<uint8_t> recs((n - 1) * stride + rec_bytes);
            for (auto& byte : recs) byte = static_cast<uint8_t>(rng.next_u64());
            for (size_t j = 0; j < n; ++j)
              for (int i = 0; i < d >> levels; ++i) {
                const int kind = static_cast<int>(rng.next_u64() % 8);
                const float r = kind == 0 ? 0.0f : kind == 1 ? 3e-6f : static_cast<float>(std::fabs(rng.gaussian()));
                const uint16_t h = float_to_half(r);
                recs[j * stride + off + 2 * i] = static_cast<uint8_t>(h);
                recs[j * stride + off + 2 * i + 1] = static_cast<uint8_t>(h >> 8);
              }
            std::vector<float> want(n * d), got(n * d);
            ref.decode_polar(L, recs.data(), stride, n, want.data());
            for (const AttnKernels* k : simd_tables()) {
              if (k->decode_polar == nullptr) continue;
              std::fill(got.begin(), got.end(), -1.0f);
              k->decode_polar(L, recs.data(), stride, n, got.data());
              for (size_t i = 0; i < got.size(); ++i)
                ASSERT_EQ(std::memcmp(&got[i], &want[i], sizeof(float)), 0)
                    << to_string(k->level) << " d " << d << " levels " << levels << " b1 " << b1
                    << " b " << b << " n " << n << " stride " << stride << " value " << i << ": "
                    << got[i] << " vs " << want[i] << " (seed " << test_seed() << ")";
              ++cases;
            }
          }
        }
  if (simd_tables().empty()) GTEST_SKIP() << "no SIMD table on this CPU/build: the reference only";
  EXPECT_GT(cases, 0);
}

TEST(AttnKernels, TablesReportTheirLevel) {
  for (SimdLevel level : available_simd_levels()) EXPECT_EQ(attn_kernels_for(level).level, level);
}

}  // namespace
}  // namespace tq::kernels
