// The dense bf16 decode-attention baseline (cuda.hpp, dense_decode_bf16)
// against attention_ref (fp64) over the same bf16-rounded K/V and query:
// normalised error <= 1e-3 per sequence, lse within 1e-4. Mixed-length
// batches with odd lengths and empty sequences, GQA 1/4/8 (and 3 and 16,
// which leave head slots idle or need two head blocks), head_dim 64/128/256,
// one split, many splits, the automatic plan. Skipped without a CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "turboquant/attention.hpp"
#include "turboquant/cuda.hpp"
#include "turboquant/error.hpp"
#include "turboquant/half.hpp"

namespace tq {
namespace {

#define TQ_SKIP_WITHOUT_GPU()                                                                \
  do {                                                                                       \
    if (!cuda::cuda_available()) GTEST_SKIP() << "no CUDA device: GPU tests skipped";        \
  } while (0)

using test::norm_err;

struct DenseCase {
  int n_heads_kv, group, head_dim;
  std::vector<int> lens;
  int max_ctx;
  int n_splits;  // 0: the automatic plan
  int max_len;   // the plan's hint (0: max_ctx)
  bool q_bf16;
  float scale;
  uint64_t seed;

  std::string name() const {
    std::string s = "Hkv " + std::to_string(n_heads_kv) + " g " + std::to_string(group) + " d " +
                    std::to_string(head_dim) + " max_ctx " + std::to_string(max_ctx) +
                    " splits " + std::to_string(n_splits) + " max_len " + std::to_string(max_len) +
                    (q_bf16 ? " q bf16" : " q f32") + " scale " + std::to_string(scale) +
                    " seed " + std::to_string(seed) + " lens {";
    for (int l : lens) s += std::to_string(l) + ",";
    return s + "}";
  }
};

// Runs one case on the device and against attention_ref; returns the worst
// normalised error (and records failures).
double run_case(const DenseCase& c) {
  SCOPED_TRACE(c.name());
  const int B = static_cast<int>(c.lens.size()), H = c.n_heads_kv, D = c.head_dim;
  const int hq = H * c.group;
  const size_t n_kv = size_t(B) * H * c.max_ctx * D;
  // K/V: Gaussian with per-channel offsets and a few large channels, rounded to bf16.
  std::vector<float> kf = test::random_gaussian(n_kv, c.seed), vf = test::random_gaussian(n_kv, c.seed + 1);
  std::vector<uint16_t> kb(n_kv), vb(n_kv);
  for (size_t i = 0; i < n_kv; ++i) {
    const int ch = static_cast<int>(i % D);
    if (ch % 29 == 5) kf[i] = 5.0f * kf[i] + 1.5f;
    kb[i] = float_to_bf16(kf[i]);
    vb[i] = float_to_bf16(vf[i] + 0.2f);
    kf[i] = bf16_to_float(kb[i]);
    vf[i] = bf16_to_float(vb[i]);
  }
  const size_t nq = size_t(B) * hq * D;
  std::vector<float> q = test::random_gaussian(nq, c.seed + 2);
  std::vector<uint16_t> qb(nq);
  for (size_t i = 0; i < nq; ++i) {
    q[i] *= 0.5f;
    if (c.q_bf16) {
      qb[i] = float_to_bf16(q[i]);
      q[i] = bf16_to_float(qb[i]);
    }
  }

  cuda::DeviceBuffer dk(n_kv * 2), dv(n_kv * 2), dlen(B * sizeof(int)),
      dq(c.q_bf16 ? nq * 2 : nq * 4), dout(nq * 4), dlse(size_t(B) * hq * 4);
  dk.upload(kb.data(), n_kv * 2);
  dv.upload(vb.data(), n_kv * 2);
  dlen.upload(c.lens.data(), B * sizeof(int));
  if (c.q_bf16) dq.upload(qb.data(), nq * 2);
  else dq.upload(q.data(), nq * 4);
  // Poison: every output element must be written.
  std::vector<float> out(nq, std::numeric_limits<float>::quiet_NaN()),
      lse(size_t(B) * hq, std::numeric_limits<float>::quiet_NaN());
  dout.upload(out.data(), nq * 4);
  dlse.upload(lse.data(), lse.size() * 4);

  cuda::DenseDecodeArgs a;
  a.batch = B;
  a.n_heads_q = hq;
  a.n_heads_kv = H;
  a.head_dim = D;
  a.max_ctx = c.max_ctx;
  a.max_len = c.max_len;
  a.k = dk.as<uint16_t>();
  a.v = dv.as<uint16_t>();
  a.lengths = dlen.as<int>();
  a.q = dq.data();
  a.q_type = c.q_bf16 ? cuda::DenseQType::bf16 : cuda::DenseQType::f32;
  a.out = dout.as<float>();
  a.lse = dlse.as<float>();
  a.scale = c.scale;
  const cuda::DenseDecodePlan plan = cuda::dense_decode_plan(a, c.n_splits);
  if (c.n_splits > 0) EXPECT_LE(plan.n_splits, c.n_splits);
  cuda::DeviceBuffer ws(plan.workspace_bytes);
  cuda::dense_decode_bf16(a, plan, ws.data(), ws.size());
  dout.download(out.data(), nq * 4);
  dlse.download(lse.data(), lse.size() * 4);

  AttentionParams params;
  params.scale = c.scale;
  double worst = 0;
  for (int b = 0; b < B; ++b) {
    const int len = std::min(c.lens[b], c.max_ctx);  // the kernel clamps to max_ctx
    std::vector<float> ref(size_t(hq) * D);
    std::vector<double> ref_lse(hq);
    for (int h = 0; h < hq; ++h) {
      const size_t head = (size_t(b) * H + h / c.group) * c.max_ctx * D;
      ref_lse[h] = attention_ref(q.data() + (size_t(b) * hq + h) * D, kf.data() + head, vf.data() + head,
                                 size_t(len), size_t(D), D, len - 1, params, ref.data() + size_t(h) * D);
    }
    const float* go = out.data() + size_t(b) * hq * D;
    const float* gl = lse.data() + size_t(b) * hq;
    if (len == 0) {
      for (int i = 0; i < hq * D; ++i) EXPECT_EQ(go[i], 0.0f) << "empty sequence " << b << ", element " << i;
      for (int h = 0; h < hq; ++h) EXPECT_EQ(gl[h], kEmptyLse) << "empty sequence " << b << ", head " << h;
      continue;
    }
    const double e = norm_err(go, ref.data(), ref.size());
    worst = std::max(worst, e);
    EXPECT_LE(e, 1e-3) << "sequence " << b << " len " << len << " (plan: " << plan.n_splits
                       << " splits of " << plan.split_tokens << " tokens)";
    for (int h = 0; h < hq; ++h)
      EXPECT_TRUE(test::close(gl[h], ref_lse[h], 1e-4, 1e-4)) << "lse, sequence " << b << " head " << h;
  }
  return worst;
}

// Odd lengths, page-like boundaries +-1, an empty sequence.
const std::vector<int> kMixedLens = {1, 0, 2, 31, 33, 54, 97, 129, 255, 257, 1000, 1537};

TEST(CudaDense, MatchesReferenceMixedBatchGqaHeadDims) {
  TQ_SKIP_WITHOUT_GPU();
  double worst = 0;
  for (int d : {64, 128, 256})
    for (int g : {1, 4, 8})
      for (int splits : {0, 1, 7}) {
        const DenseCase c{2, g, d, kMixedLens, 1600, splits, 0, false, 0.0f,
                          uint64_t(1000 + 10 * d + g + 100 * splits)};
        worst = std::max(worst, run_case(c));
      }
  std::printf("worst normalised error vs attention_ref: %.3g\n", worst);
}

TEST(CudaDense, Bf16QueryExplicitScaleAndOddGroups) {
  TQ_SKIP_WITHOUT_GPU();
  // g 3 leaves a head slot of the block idle; g 16 needs two blocks per KV head.
  for (int g : {3, 16})
    run_case({2, g, 128, {5, 97, 300, 0}, 320, 0, 0, true, 0.05f, uint64_t(77 + g)});
  run_case({1, 4, 256, {3, 64, 511}, 512, 3, 0, true, 0.0f, 91});
}

TEST(CudaDense, LongContextAutoPlanAndLengthsPastTheHint) {
  TQ_SKIP_WITHOUT_GPU();
  // Many splits from the automatic plan; then a plan sized for 1000 tokens
  // run on longer sequences (the last split takes the rest).
  run_case({2, 4, 128, {20011, 4099, 1}, 20011, 0, 0, false, 0.0f, 5});
  run_case({2, 4, 64, {3001, 999, 1200}, 3001, 0, 1000, false, 0.0f, 6});
  // Lengths over max_ctx are clamped to it.
  run_case({1, 4, 64, {300, 5, 257}, 257, 2, 0, false, 0.0f, 7});
}

TEST(CudaDense, PlanAndArgumentChecks) {
  TQ_SKIP_WITHOUT_GPU();
  cuda::DenseDecodeArgs a;
  a.batch = 2;
  a.n_heads_q = 8;
  a.n_heads_kv = 2;
  a.head_dim = 128;
  a.max_ctx = 1024;
  const cuda::DenseDecodePlan plan = cuda::dense_decode_plan(a);
  EXPECT_GE(plan.n_splits, 1);
  EXPECT_EQ(plan.heads_per_block, 4);
  EXPECT_EQ(plan.n_head_blocks, 1);
  EXPECT_GE(size_t(plan.n_splits) * plan.split_tokens, size_t(a.max_ctx));
  auto bad = a;
  bad.head_dim = 96;
  EXPECT_THROW(cuda::dense_decode_plan(bad), Error);
  bad = a;
  bad.n_heads_q = 7;
  EXPECT_THROW(cuda::dense_decode_plan(bad), Error);
  bad = a;
  bad.max_len = 2000;
  EXPECT_THROW(cuda::dense_decode_plan(bad), Error);
  // Null pointers, a plan for another shape, a short workspace: refused before any launch.
  EXPECT_THROW(cuda::dense_decode_bf16(a, plan, nullptr, 0), Error);
  cuda::DeviceBuffer kv(size_t(2) * 2 * 1024 * 128 * 2), misc(4096);
  a.k = kv.as<uint16_t>();
  a.v = kv.as<uint16_t>();
  a.lengths = misc.as<int>();
  a.q = misc.data();
  a.out = misc.as<float>();
  bad = a;
  bad.batch = 3;
  EXPECT_THROW(cuda::dense_decode_bf16(bad, plan, nullptr, 0), Error);
  const auto forced = cuda::dense_decode_plan(a, 4);
  ASSERT_GT(forced.workspace_bytes, 0u);
  EXPECT_THROW(cuda::dense_decode_bf16(a, forced, misc.data(), 16), Error);
  const auto one = cuda::dense_decode_plan(a, 1);
  ASSERT_EQ(one.workspace_bytes, 0u);
  bad = a;
  bad.k = reinterpret_cast<const uint16_t*>(kv.as<uint8_t>() + 2);
  EXPECT_THROW(cuda::dense_decode_bf16(bad, one, nullptr, 0), Error);
}

}  // namespace
}  // namespace tq
