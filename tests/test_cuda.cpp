// The GPU KV layer against the CPU reference (issue 5): quantize-append codes
// bit-identical to the CPU quantizer; decode attention within 1e-3 (normalised
// error) of the CPU's attention over the same records. Every test skips when
// there is no CUDA device, or the library was built without CUDA.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "turboquant/cuda.hpp"
#include "turboquant/error.hpp"
#include "turboquant/half.hpp"
#include "turboquant/kv_cache.hpp"
#include "turboquant/quantizer.hpp"
#include "turboquant/record_attention.hpp"

namespace tq {
namespace {

#define TQ_SKIP_WITHOUT_GPU()                                                   \
  do {                                                                          \
    if (!cuda::cuda_available()) GTEST_SKIP() << "no CUDA device: GPU tests skipped"; \
  } while (0)

using test::norm_err;

// Gaussian vectors with magnitudes spread over 1e-6 .. 1e1 (fp16 scales from
// subnormal to large), a few exact zero vectors and one huge channel in some.
std::vector<float> awkward_vectors(size_t n_vec, int d, uint64_t seed) {
  std::vector<float> x = test::random_gaussian(n_vec * d, seed);
  for (size_t r = 0; r < n_vec; ++r) {
    float* v = &x[r * d];
    if (r % 23 == 7) {
      std::fill(v, v + d, 0.0f);
      continue;
    }
    const float mag = std::pow(10.0f, static_cast<float>(int(r % 8) - 6));  // norms < 65504
    for (int i = 0; i < d; ++i) v[i] *= mag;
    if (r % 5 == 1) v[r % d] *= 40.0f;
  }
  return x;
}

// K/V with realistic structure: a few large channels and non-zero means.
std::vector<float> kv_data(size_t n, int d, uint64_t seed) {
  std::vector<float> x = test::random_gaussian(n * d, seed);
  for (size_t i = 0; i < x.size(); ++i) {
    const int c = static_cast<int>(i % d);
    if (c % 17 == 3) x[i] = 6.0f * x[i] + 2.0f;
    else x[i] += 0.3f;
  }
  return x;
}

// Compares every record of tokens [t0, t1) of a sequence with the CPU
// encoding of x (rows [t, head], starting at token t0). Returns mismatches.
int compare_records(const cuda::GpuKvLayer& layer, int seq, const Quantizer& kq,
                    const Quantizer& vq, const float* k, const float* v, int t0, int t1,
                    const std::string& what) {
  const int H = layer.config().n_heads_kv, P = layer.config().page_tokens, d = layer.head_dim();
  const size_t kb = kq.bytes_per_vector(), vb = vq.bytes_per_vector();
  std::vector<uint8_t> page(layer.page_bytes()), ref_k(kb), ref_v(vb);
  int bad = 0, loaded = -1;
  for (int t = t0; t < t1; ++t) {
    if (t / P != loaded) {
      loaded = t / P;
      layer.download_page(seq, loaded, page.data());
    }
    for (int h = 0; h < H; ++h) {
      const size_t row = size_t(t - t0) * H + h;
      kq.encode_one(k + row * d, ref_k.data());
      vq.encode_one(v + row * d, ref_v.data());
      const uint8_t* gk = page.data() + (size_t(h) * P + t % P) * kb;
      const uint8_t* gv = page.data() + size_t(P) * H * kb + (size_t(h) * P + t % P) * vb;
      for (auto [g, r, n, name] : {std::tuple{gk, ref_k.data(), kb, "K"},
                                   std::tuple{gv, ref_v.data(), vb, "V"}})
        if (std::memcmp(g, r, n) != 0) {
          if (bad++ < 5) {
            size_t i = 0;
            while (g[i] == r[i]) ++i;
            ADD_FAILURE() << what << ": " << name << " record of token " << t << " head " << h
                          << " differs at byte " << i << " of " << n << ": GPU " << int(g[i])
                          << " CPU " << int(r[i]);
          }
        }
    }
  }
  return bad;
}

TEST(Cuda, DeviceQuery) {
  TQ_SKIP_WITHOUT_GPU();
  EXPECT_GT(cuda::cuda_device_count(), 0);
  const std::string name = cuda::cuda_device_name(0);
  EXPECT_FALSE(name.empty());
  std::printf("CUDA device 0: %s\n", name.c_str());
}

TEST(CudaAppend, CodesBitIdenticalToCpuQuantizer) {
  TQ_SKIP_WITHOUT_GPU();
  const int H = 3, P = 16;
  int total_bad = 0;
  for (int d : {64, 128, 256})
    for (int kbits : {2, 3, 4})
      for (const char* extra : {"", ",sf=f32", ",cb=gauss"}) {
        const int vbits = 2 + (kbits + 1) % 3;  // a different width for V
        const std::string ks = "tq-mse:b=" + std::to_string(kbits) + extra;
        const std::string vs = "tq-mse:b=" + std::to_string(vbits) + extra;
        const uint64_t seed = 1000 + d + kbits;
        const std::string what = ks + " / " + vs + " d " + std::to_string(d) + " seed " +
                                 std::to_string(seed);
        SCOPED_TRACE(what);
        auto kq = make_quantizer(ks, d, seed), vq = make_quantizer(vs, d, seed + 1);
        cuda::GpuKvLayerConfig cfg;
        cfg.n_heads_kv = H;
        cfg.page_tokens = P;
        cfg.max_seqs = 2;
        cfg.max_pages_per_seq = 16;
        cuda::GpuKvLayer layer(*kq, *vq, cfg);
        const int s0 = layer.add_sequence(), s1 = layer.add_sequence();
        // Host appends in odd chunks across page boundaries: 1 + 30 + 2 = 33 tokens.
        const int n_host = 33, n_dev = 54;
        const auto k = awkward_vectors(size_t(n_host + n_dev) * H, d, seed * 7);
        const auto v = awkward_vectors(size_t(n_host + n_dev) * H, d, seed * 7 + 1);
        int t = 0;
        for (int chunk : {1, 30, 2}) {
          layer.append(s0, k.data() + size_t(t) * H * d, v.data() + size_t(t) * H * d, chunk);
          t += chunk;
        }
        // Device-pointer append of the rest into the second sequence.
        const size_t rest = size_t(n_dev) * H * d;
        cuda::DeviceBuffer dk(rest * sizeof(float)), dv(rest * sizeof(float));
        dk.upload(k.data() + size_t(n_host) * H * d, rest * sizeof(float));
        dv.upload(v.data() + size_t(n_host) * H * d, rest * sizeof(float));
        layer.append_device(s1, dk.as<float>(), dv.as<float>(), n_dev);
        ASSERT_EQ(layer.n_tokens(s0), n_host);
        ASSERT_EQ(layer.n_tokens(s1), n_dev);
        ASSERT_EQ(layer.k_record_bytes(), kq->bytes_per_vector());
        total_bad += compare_records(layer, s0, *kq, *vq, k.data(), v.data(), 0, n_host, what);
        total_bad += compare_records(layer, s1, *kq, *vq, k.data() + size_t(n_host) * H * d,
                                     v.data() + size_t(n_host) * H * d, 0, n_dev, what);
      }
  EXPECT_EQ(total_bad, 0);
}

TEST(CudaAppend, BatchOfDecodeTokensLandsInEachSequence) {
  TQ_SKIP_WITHOUT_GPU();
  const int H = 2, d = 128, P = 16, n_seqs = 5;
  auto kq = make_quantizer("tq-mse:b=4", d, 3), vq = make_quantizer("tq-mse:b=3", d, 4);
  cuda::GpuKvLayerConfig cfg{H, P, n_seqs, 8, 0, 2};
  cuda::GpuKvLayer layer(*kq, *vq, cfg);
  std::vector<std::vector<float>> ks(n_seqs), vs(n_seqs);
  for (int s = 0; s < n_seqs; ++s) {
    layer.add_sequence();
    const int n0 = 15 + s;  // each sequence one token before/after a page boundary
    ks[s] = kv_data(size_t(n0 + 1) * H, d, 50 + s);
    vs[s] = kv_data(size_t(n0 + 1) * H, d, 60 + s);
    layer.append(s, ks[s].data(), vs[s].data(), n0);
  }
  std::vector<int> seqs = {3, 0, 4, 1, 2};
  std::vector<float> bk, bv;
  for (int s : seqs) {
    const size_t off = size_t(15 + s) * H * d;
    bk.insert(bk.end(), ks[s].begin() + off, ks[s].begin() + off + H * d);
    bv.insert(bv.end(), vs[s].begin() + off, vs[s].begin() + off + H * d);
  }
  cuda::DeviceBuffer dk(bk.size() * 4), dv(bv.size() * 4);
  dk.upload(bk.data(), bk.size() * 4);
  dv.upload(bv.data(), bv.size() * 4);
  layer.append_batch_device(seqs.data(), n_seqs, dk.as<float>(), dv.as<float>());
  int bad = 0;
  for (int s = 0; s < n_seqs; ++s) {
    ASSERT_EQ(layer.n_tokens(s), 16 + s);
    bad += compare_records(layer, s, *kq, *vq, ks[s].data(), vs[s].data(), 0, 16 + s,
                           "batch seq " + std::to_string(s));
  }
  EXPECT_EQ(bad, 0);
  EXPECT_THROW(layer.append_batch_device(std::vector<int>{1, 1}.data(), 2, dk.as<float>(),
                                         dv.as<float>()),
               Error);
}

TEST(CudaAppend, RefusesNonFiniteAndScaleOverflowLeavingSequenceUnchanged) {
  TQ_SKIP_WITHOUT_GPU();
  const int d = 64;
  auto kq = make_quantizer("tq-mse:b=3", d, 1), vq = make_quantizer("tq-mse:b=3", d, 2);
  cuda::GpuKvLayerConfig cfg;
  cfg.page_tokens = 4;
  cfg.max_pages_per_seq = 4;
  cuda::GpuKvLayer layer(*kq, *vq, cfg);
  const int s = layer.add_sequence();
  auto k = kv_data(3, d, 1), v = kv_data(3, d, 2);
  layer.append(s, k.data(), v.data(), 3);
  auto bad = kv_data(3, d, 3);
  bad[d + 5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(layer.append(s, bad.data(), v.data(), 3), Error);
  EXPECT_EQ(layer.n_tokens(s), 3);
  EXPECT_EQ(layer.n_pages(s), 1);
  auto big = kv_data(2, d, 4);
  for (auto& x : big) x *= 1e5f;  // norm > 65504: fp16 scale overflow, as on the CPU
  EXPECT_THROW(kq->encode_one(big.data(), std::vector<uint8_t>(kq->bytes_per_vector()).data()), Error);
  EXPECT_THROW(layer.append(s, k.data(), big.data(), 2), Error);
  EXPECT_EQ(layer.n_tokens(s), 3);
  // Capacity: 16 tokens.
  auto many = kv_data(14, d, 5);
  EXPECT_THROW(layer.append(s, many.data(), many.data(), 14), Error);
  layer.append(s, many.data(), many.data(), 13);
  EXPECT_EQ(layer.n_tokens(s), 16);
  EXPECT_EQ(compare_records(layer, s, *kq, *vq, many.data(), many.data(), 3, 16, "after refusals")
            + compare_records(layer, s, *kq, *vq, k.data(), v.data(), 0, 3, "first tokens"), 0);
}

// CPU attention over the GPU's own pages (downloaded), via attend_records.
// out: [Hq, d], lse: [Hq]
void cpu_attend_pages(const cuda::GpuKvLayer& layer, int seq, const Quantizer& kq,
                      const Quantizer& vq, const float* q, int hq, const AttentionParams& p,
                      float* out, float* lse) {
  const int H = layer.config().n_heads_kv, P = layer.config().page_tokens, d = layer.head_dim();
  const int g = hq / H, len = layer.n_tokens(seq);
  const size_t kb = kq.bytes_per_vector(), vb = vq.bytes_per_vector();
  std::vector<std::vector<uint8_t>> pages(layer.n_pages(seq));
  for (size_t i = 0; i < pages.size(); ++i) {
    pages[i].resize(layer.page_bytes());
    layer.download_page(seq, int(i), pages[i].data());
  }
  std::vector<float> qp(size_t(g) * kq.query_floats());
  for (int h = 0; h < H; ++h) {
    OnlineSoftmax st(g, vq.acc_floats());
    kq.prepare_queries(q + size_t(h) * g * d, g, qp.data());
    for (int pg = 0; pg * P < len; ++pg) {
      const uint8_t* base = pages[pg].data();
      const size_t n = std::min(P, len - pg * P);
      attend_records(kq, vq, qp.data(), g, base + size_t(h) * P * kb, kb,
                     base + size_t(P) * H * kb + size_t(h) * P * vb, vb, n, pg * P, len - 1, p, st);
    }
    st.finish(vq, out + size_t(h) * g * d, lse + size_t(h) * g);
  }
}

struct AttnCase {
  const char* name;
  AttentionParams params;
};

TEST(CudaAttention, MatchesCpuOverSameRecordsMixedLengthsGqaSplits) {
  TQ_SKIP_WITHOUT_GPU();
  const int H = 2, P = 16;
  // Mixed batch: empty, awkward lengths, page boundaries +-1.
  const std::vector<int> lens = {0, 1, 2, 15, 16, 17, 31, 33, 54, 97, 129, 257};
  const AttnCase cases[] = {{"plain", {}},
                            {"softcap+window+sinks", {0.0f, 30.0f, 40, 2}},
                            {"scale", {0.05f, 0.0f, 0, 0}}};
  double worst = 0;
  for (int d : {64, 128, 256})
    for (int g : {1, 4, 8})
      for (const auto& [kspec, vspec] : {std::pair{"tq-mse:b=4", "tq-mse:b=3"},
                                         std::pair{"tq-mse:b=2", "tq-mse:b=4,sf=f32"}}) {
        const int hq = H * g;
        const uint64_t seed = 77 + d * 3 + g;
        auto kq = make_quantizer(kspec, d, seed), vq = make_quantizer(vspec, d, seed + 1);
        cuda::GpuKvLayerConfig cfg;
        cfg.n_heads_kv = H;
        cfg.page_tokens = P;
        cfg.max_seqs = int(lens.size());
        cfg.max_pages_per_seq = 17;
        cfg.split_pages = 2;  // 257 tokens: 9 splits, the last one short
        cuda::GpuKvLayer layer(*kq, *vq, cfg);
        for (size_t s = 0; s < lens.size(); ++s) {
          layer.add_sequence();
          auto k = kv_data(size_t(lens[s]) * H, d, seed * 100 + s);
          auto v = kv_data(size_t(lens[s]) * H, d, seed * 100 + s + 50);
          layer.append(int(s), k.data(), v.data(), lens[s]);
        }
        const size_t nq = lens.size() * hq * d;
        const auto q = test::random_gaussian(nq, seed + 9);
        cuda::DeviceBuffer dq(nq * 4), dout(nq * 4), dlse(lens.size() * hq * 4),
            ws(layer.workspace_bytes(hq));
        dq.upload(q.data(), nq * 4);
        for (const auto& c : cases) {
          const std::string what = std::string(kspec) + " / " + vspec + " d " + std::to_string(d) +
                                   " g " + std::to_string(g) + " " + c.name + " seed " +
                                   std::to_string(seed);
          SCOPED_TRACE(what);
          // Poison the outputs: every element must be written.
          std::vector<float> out(nq, std::numeric_limits<float>::quiet_NaN()),
              lse(lens.size() * hq, std::numeric_limits<float>::quiet_NaN());
          dout.upload(out.data(), nq * 4);
          dlse.upload(lse.data(), lse.size() * 4);
          layer.attend(dq.as<float>(), hq, c.params, dout.as<float>(), dlse.as<float>(), ws.data(),
                       ws.size());
          dout.download(out.data(), nq * 4);
          dlse.download(lse.data(), lse.size() * 4);
          for (size_t s = 0; s < lens.size(); ++s) {
            std::vector<float> ro(size_t(hq) * d), rl(hq);
            cpu_attend_pages(layer, int(s), *kq, *vq, q.data() + s * hq * d, hq, c.params,
                             ro.data(), rl.data());
            const float* go = out.data() + s * hq * d;
            if (lens[s] == 0) {
              for (int i = 0; i < hq * d; ++i) ASSERT_EQ(go[i], 0.0f) << "empty seq, elem " << i;
              for (int h = 0; h < hq; ++h) ASSERT_EQ(lse[s * hq + h], kEmptyLse);
              continue;
            }
            const double e = norm_err(go, ro.data(), size_t(hq) * d);
            worst = std::max(worst, e);
            EXPECT_LE(e, 1e-3) << "len " << lens[s];
            for (int h = 0; h < hq; ++h)
              EXPECT_TRUE(test::close(lse[s * hq + h], rl[h], 1e-4, 1e-4))
                  << "lse, len " << lens[s] << " head " << h;
          }
        }
      }
  std::printf("worst normalised error vs CPU attend_records: %.3g\n", worst);
}

TEST(CudaAttention, MatchesKvCacheAttend) {
  TQ_SKIP_WITHOUT_GPU();
  for (int g : {1, 4, 8}) {
    SCOPED_TRACE("gqa " + std::to_string(g));
    KvCacheConfig cc;
    cc.n_layers = 1;
    cc.n_heads_kv = 2;
    cc.head_dim = 128;
    cc.k_format = parse_format("tq-mse:b=4");
    cc.v_format = parse_format("tq-mse:b=3");
    cc.page_tokens = 16;
    cc.seed = 11;
    KvCache cache(cc);
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = cc.n_heads_kv;
    cfg.page_tokens = cc.page_tokens;
    cfg.max_seqs = 3;
    cfg.max_pages_per_seq = 8;
    cfg.split_pages = 3;
    cuda::GpuKvLayer layer(cache.k_quantizer(0), cache.v_quantizer(0), cfg);
    const int hq = cc.n_heads_kv * g, d = cc.head_dim;
    const std::vector<int> lens = {33, 97, 128};
    for (int s = 0; s < 3; ++s) {
      ASSERT_EQ(cache.add_sequence(), s);
      layer.add_sequence();
      auto k = kv_data(size_t(lens[s]) * cc.n_heads_kv, d, 300 + s);
      auto v = kv_data(size_t(lens[s]) * cc.n_heads_kv, d, 400 + s);
      // KvCache::append encodes each token from its dense-format (f16) value;
      // the GPU layer encodes its fp32 input as given. f16-representable
      // inputs make both write the same bytes (on raw fp32 input the outputs
      // differ by ~0.5-3%: other records, not another kernel).
      for (auto* a : {&k, &v})
        for (float& x : *a) x = half_to_float(float_to_half(x));
      cache.append(s, 0, k.data(), v.data(), lens[s]);
      layer.append(s, k.data(), v.data(), lens[s]);
    }
    const size_t nq = size_t(3) * hq * d;
    const auto q = test::random_gaussian(nq, 5 + g);
    cuda::DeviceBuffer dq(nq * 4), dout(nq * 4), ws(layer.workspace_bytes(hq));
    dq.upload(q.data(), nq * 4);
    std::vector<float> out(nq, std::numeric_limits<float>::quiet_NaN());
    dout.upload(out.data(), nq * 4);
    layer.attend(dq.as<float>(), hq, {}, dout.as<float>(), nullptr, ws.data(), ws.size());
    dout.download(out.data(), nq * 4);
    for (int s = 0; s < 3; ++s) {
      std::vector<float> ref(size_t(hq) * d);
      cache.attend(s, 0, q.data() + size_t(s) * hq * d, hq, {}, ref.data());
      EXPECT_LE(norm_err(out.data() + size_t(s) * hq * d, ref.data(), ref.size()), 1e-3)
          << "seq " << s << " len " << lens[s];
    }
  }
}

TEST(CudaAttention, RejectsBadShapes) {
  TQ_SKIP_WITHOUT_GPU();
  auto kq = make_quantizer("tq-mse:b=4", 128, 1), vq = make_quantizer("tq-mse:b=4", 128, 2);
  auto prod = make_quantizer("tq-prod:b=4", 128, 1);
  auto odd = make_quantizer("tq-mse:b=4", 96, 1);
  cuda::GpuKvLayerConfig cfg;
  cfg.n_heads_kv = 2;
  EXPECT_THROW((void)cuda::GpuKvLayer(*prod, *vq, cfg), Error);
  EXPECT_THROW((void)cuda::GpuKvLayer(*odd, *odd, cfg), Error);
  cuda::GpuKvLayer layer(*kq, *vq, cfg);
  layer.add_sequence();
  cuda::DeviceBuffer ws(layer.workspace_bytes(4));
  EXPECT_THROW(layer.attend(nullptr, 3, {}, nullptr, nullptr, ws.data(), ws.size()), Error);
  EXPECT_THROW(layer.attend(nullptr, 4, {}, nullptr, nullptr, ws.data(), 8), Error);
  EXPECT_THROW(layer.add_sequence(), Error);
}

}  // namespace
}  // namespace tq
