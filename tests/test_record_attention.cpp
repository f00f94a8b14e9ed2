// Attention on encoded records equals fp64 attention on the decoded K/V, for
// every format; merge of partial states is exact.
#include <gtest/gtest.h>

#include <cmath>

#include "test_util.hpp"
#include "turboquant/attention.hpp"
#include "turboquant/record_attention.hpp"

namespace tq {
namespace {

using test::norm_err;

struct AttnRun {
  std::vector<float> out, lse;
};

// Attention over records split into chunks of `chunk` tokens.
AttnRun run_records(const Quantizer& kq, const Quantizer& vq, const std::vector<float>& q, int g,
                const std::vector<uint8_t>& kr, const std::vector<uint8_t>& vr, size_t n,
                size_t chunk, int q_pos, const AttentionParams& p) {
  std::vector<float> qp(size_t(g) * kq.query_floats());
  kq.prepare_queries(q.data(), g, qp.data());
  OnlineSoftmax st(g, vq.acc_floats());
  const size_t kb = kq.bytes_per_vector(), vb = vq.bytes_per_vector();
  for (size_t j0 = 0; j0 < n; j0 += chunk) {
    const size_t c = std::min(chunk, n - j0);
    attend_records(kq, vq, qp.data(), g, kr.data() + j0 * kb, kb, vr.data() + j0 * vb, vb, c,
                   static_cast<int>(j0), q_pos, p, st);
  }
  AttnRun r;
  r.out.resize(size_t(g) * vq.dim());
  r.lse.resize(g);
  st.finish(vq, r.out.data(), r.lse.data());
  return r;
}

TEST(RecordAttention, EqualsFp64AttentionOnDecodedKV) {
  const std::vector<std::pair<std::string, std::string>> kv = {
      {"tq-mse:b=3", "tq-mse:b=4"}, {"tq-mse:b=2", "tq-mse:b=2"}, {"tq-mse:b=2.5", "tq-mse:b=3.5"},
      {"tq-prod:b=3", "tq-mse:b=4"}, {"tq-prod:b=2,s=gauss,m=96", "tq-prod:b=4"},
      {"polar", "tq-mse:b=4"}, {"q8_0", "q4_0"}, {"q4_0:rot=hadamard", "q8_0:rot=haar"},
      {"f16", "bf16"}, {"f32", "f32"}, {"tq-mse:b=4,rot=haar,scale=ls", "tq-mse:b=3,scale=matched"}};
  for (const auto& [ks, vs] : kv)
    for (int dim : {64, 128})
      for (size_t n : {size_t(1), size_t(2), size_t(31), size_t(97), size_t(257)})
        for (int g : {1, 4}) {
          SCOPED_TRACE(ks + " / " + vs + " dim " + std::to_string(dim) + " n " +
                       std::to_string(n) + " g " + std::to_string(g));
          auto kq = make_quantizer(ks, dim, 11);
          auto vq = make_quantizer(vs, dim, 12);
          std::vector<float> k = test::random_gaussian(n * dim, n + dim);
          std::vector<float> v = test::random_gaussian(n * dim, n + dim + 1);
          std::vector<float> q = test::random_gaussian(size_t(g) * dim, n + 7);
          for (auto& x : q) x *= 2.0f;  // sharper softmax
          std::vector<uint8_t> kr(n * kq->bytes_per_vector()), vr(n * vq->bytes_per_vector());
          kq->encode(k, kr);
          vq->encode(v, vr);
          std::vector<float> kd(k.size()), vd(v.size());
          kq->decode(kr, kd);
          vq->decode(vr, vd);
          AttentionParams p;
          const int q_pos = static_cast<int>(n) - 1;
          const AttnRun r = run_records(*kq, *vq, q, g, kr, vr, n, 40, q_pos, p);
          for (int h = 0; h < g; ++h) {
            std::vector<float> ref(dim);
            const double lse = attention_ref(q.data() + h * dim, kd.data(), vd.data(), n, dim, dim,
                                             q_pos, p, ref.data());
            EXPECT_LE(norm_err(r.out.data() + h * dim, ref.data(), dim), 1e-5) << "head " << h;
            EXPECT_NEAR(r.lse[h], lse, 1e-4 * std::max(1.0, std::fabs(lse)));
          }
        }
}

TEST(RecordAttention, MaskingSoftcapWindowSinks) {
  const int dim = 64;
  const size_t n = 129;
  auto kq = make_quantizer("tq-mse:b=4", dim, 1);
  auto vq = make_quantizer("tq-mse:b=4", dim, 2);
  std::vector<float> k = test::random_gaussian(n * dim, 1), v = test::random_gaussian(n * dim, 2);
  std::vector<float> q = test::random_gaussian(dim, 3);
  for (auto& x : q) x *= 4.0f;
  std::vector<uint8_t> kr(n * kq->bytes_per_vector()), vr(n * vq->bytes_per_vector());
  kq->encode(k, kr);
  vq->encode(v, vr);
  std::vector<float> kd(k.size()), vd(v.size());
  kq->decode(kr, kd);
  vq->decode(vr, vd);
  for (AttentionParams p : {AttentionParams{0, 30.0f, 0, 0}, AttentionParams{0, 0, 16, 0},
                            AttentionParams{0, 0, 16, 4}, AttentionParams{0.05f, 0, 0, 0},
                            AttentionParams{0, 50.0f, 33, 2}})
    for (int q_pos : {0, 5, 64, 100, 128})
      for (size_t chunk : {size_t(1), size_t(32), size_t(200)}) {
        SCOPED_TRACE("softcap " + std::to_string(p.softcap) + " window " + std::to_string(p.window) +
                     " sinks " + std::to_string(p.n_sinks) + " q_pos " + std::to_string(q_pos) +
                     " chunk " + std::to_string(chunk));
        const AttnRun r = run_records(*kq, *vq, q, 1, kr, vr, n, chunk, q_pos, p);
        std::vector<float> ref(dim);
        attention_ref(q.data(), kd.data(), vd.data(), n, dim, dim, q_pos, p, ref.data());
        EXPECT_LE(norm_err(r.out.data(), ref.data(), dim), 1e-5);
      }
}

TEST(RecordAttention, NoVisibleKeyGivesZeroAndEmptyLse) {
  auto kq = make_quantizer("tq-mse:b=3", 64, 1);
  std::vector<float> k = test::random_gaussian(64 * 4, 1);
  std::vector<uint8_t> kr(4 * kq->bytes_per_vector());
  kq->encode(k, kr);
  std::vector<float> q = test::random_gaussian(64, 2);
  // Query at position 1 cannot see keys at positions 10..13.
  std::vector<float> qp(64);
  kq->prepare_queries(q.data(), 1, qp.data());
  OnlineSoftmax st(1, kq->acc_floats());
  attend_records(*kq, *kq, qp.data(), 1, kr.data(), kq->bytes_per_vector(), kr.data(),
                 kq->bytes_per_vector(), 4, 10, 1, AttentionParams{}, st);
  std::vector<float> out(64, 1.0f);
  float lse = 0;
  st.finish(*kq, out.data(), &lse);
  EXPECT_EQ(lse, kEmptyLse);
  for (float x : out) EXPECT_EQ(x, 0.0f);
}

TEST(Merge, SplitThenMergeEqualsUnsplit) {
  const int dim = 128;
  const size_t n = 200;
  std::vector<float> k = test::random_gaussian(n * dim, 4), v = test::random_gaussian(n * dim, 5);
  std::vector<float> q = test::random_gaussian(dim, 6);
  AttentionParams p;
  std::vector<float> all(dim), a(dim), b(dim), m(dim);
  const double lse_all = attention_ref(q.data(), k.data(), v.data(), n, dim, dim, 1000, p, all.data());
  for (size_t split : {size_t(1), size_t(77), size_t(199)}) {
    const double la = attention_ref(q.data(), k.data(), v.data(), split, dim, dim, 1000, p, a.data());
    const double lb = attention_ref(q.data(), k.data() + split * dim, v.data() + split * dim,
                                    n - split, dim, dim, 1000, p, b.data());
    float lse = 0;
    merge_states(a.data(), float(la), b.data(), float(lb), m.data(), &lse, dim);
    EXPECT_LE(norm_err(m.data(), all.data(), dim), 1e-6);
    EXPECT_NEAR(lse, lse_all, 1e-5 * std::fabs(lse_all) + 1e-6);
    // In place (o aliases o_a).
    merge_states(a.data(), float(la), b.data(), float(lb), a.data(), &lse, dim);
    EXPECT_EQ(a, m);
  }
}

TEST(Merge, EmptyPartIsNeutralAndNeverNaN) {
  std::vector<float> a = {1, 2, 3}, e = {0, 0, 0}, o(3);
  float lse = 0;
  merge_states(a.data(), 0.5f, e.data(), kEmptyLse, o.data(), &lse, 3);
  EXPECT_EQ(o, a);
  EXPECT_EQ(lse, 0.5f);
  merge_states(e.data(), kEmptyLse, a.data(), 0.5f, o.data(), &lse, 3);
  EXPECT_EQ(o, a);
  merge_states(e.data(), kEmptyLse, e.data(), kEmptyLse, o.data(), &lse, 3);
  for (float x : o) EXPECT_EQ(x, 0.0f);
  EXPECT_EQ(lse, kEmptyLse);
  // Very different magnitudes: no overflow.
  merge_states(a.data(), 1e4f, e.data(), -1e4f, o.data(), &lse, 3);
  EXPECT_EQ(o, a);
  EXPECT_FALSE(std::isnan(lse));
}

}  // namespace
}  // namespace tq
