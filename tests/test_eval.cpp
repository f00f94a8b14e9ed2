// Quality evaluation: the metrics against hand-computed values, the HTML
// text extraction, and (when SmolLM2 is pulled) evaluate() on a slice of real
// text: dense against dense is exactly equal, a compressed preset is close.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <vector>

#include "turboquant/error.hpp"
#include "turboquant/eval.hpp"
#include "turboquant/model.hpp"
#include "turboquant/model_registry.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq {
namespace {

std::vector<float> logs(std::initializer_list<double> p) {
  std::vector<float> x;
  for (double v : p) x.push_back(float(std::log(v)));
  return x;
}

TEST(EvalMetrics, LogSumExpIsStable) {
  const std::vector<float> a = {0, 0};
  EXPECT_NEAR(log_sum_exp(a.data(), 2), std::log(2.0), 1e-15);
  const std::vector<float> big = {1000, 1000, 1000, 1000};  // exp overflows in float and double
  EXPECT_NEAR(log_sum_exp(big.data(), 4), 1000 + std::log(4.0), 1e-12);
  const std::vector<float> small = {-1000, -1000};
  EXPECT_NEAR(log_sum_exp(small.data(), 2), -1000 + std::log(2.0), 1e-12);
}

TEST(EvalMetrics, KlOfIdenticalDistributionsIsExactlyZero) {
  const std::vector<float> x = {3.5f, -2.0f, 0.25f, 31.0f, -40.0f, 7.0f};
  EXPECT_EQ(kl_divergence(x.data(), x.data(), int(x.size())), 0.0);
  // The same distribution with shifted logits: 0 up to rounding.
  std::vector<float> y = x;
  for (float& v : y) v += 16.0f;
  EXPECT_NEAR(kl_divergence(x.data(), y.data(), int(x.size())), 0.0, 1e-12);
}

TEST(EvalMetrics, KlOfKnownDistributions) {
  // p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4):
  // KL(p||q) = 1/2 ln 2 + 1/4 ln(1/2) + 0 = ln(2) / 4;  KL(q||p) = 1/4 ln(1/2) + 1/2 ln 2 = ln(2) / 4.
  const auto p = logs({0.5, 0.25, 0.25}), q = logs({0.25, 0.5, 0.25});
  EXPECT_NEAR(kl_divergence(p.data(), q.data(), 3), std::log(2.0) / 4, 1e-7);
  EXPECT_NEAR(kl_divergence(q.data(), p.data(), 3), std::log(2.0) / 4, 1e-7);
  // p = (0.9, 0.1), q = (0.5, 0.5): 0.9 ln 1.8 + 0.1 ln 0.2.
  const auto a = logs({0.9, 0.1}), b = logs({0.5, 0.5});
  EXPECT_NEAR(kl_divergence(a.data(), b.data(), 2), 0.9 * std::log(1.8) + 0.1 * std::log(0.2), 1e-7);
  // Unnormalised logits of 30+ and a large vocabulary: still finite and right.
  std::vector<float> x(262144, 30.0f), y(262144, 30.0f);
  x[7] = 40.0f;
  const double lx = std::log(262143.0 + std::exp(10.0)), p7 = std::exp(10.0 - lx);
  // y is uniform: KL = sum p ln(p * V) = ln V - H(p).
  const double h = -(p7 * std::log(p7) + (1 - p7) * std::log((1 - p7) / 262143.0));
  EXPECT_NEAR(kl_divergence(x.data(), y.data(), 262144), std::log(262144.0) - h, 1e-6);
}

TEST(EvalMetrics, PerplexityOfAKnownDistribution) {
  // A uniform model over V tokens has perplexity V, whatever the targets.
  std::vector<float> u(50, 1.234f);
  EvalStats s;
  for (int t : {0, 7, 49, 3}) s.add(u.data(), u.data(), 50, t);
  EXPECT_NEAR(s.ppl(), 50.0, 1e-9);
  EXPECT_NEAR(s.ppl_ref(), 50.0, 1e-9);
  EXPECT_EQ(s.kl_mean(), 0.0);
  EXPECT_EQ(s.top1_agree(), 1.0);
  // Targets of probability 1/2 and 1/8: ppl = (2 * 8)^(1/2) = 4.
  const auto p = logs({0.5, 0.375, 0.125});
  EvalStats k;
  k.add(p.data(), p.data(), 3, 0);
  k.add(p.data(), p.data(), 3, 2);
  EXPECT_NEAR(k.ppl(), 4.0, 1e-6);
  EXPECT_NEAR(token_nll(p.data(), 3, 2), std::log(8.0), 1e-7);
}

TEST(EvalMetrics, AgreementAndKlMaxAccumulate) {
  const auto p = logs({0.5, 0.25, 0.25}), q = logs({0.25, 0.5, 0.25});
  EvalStats s;
  s.add(p.data(), p.data(), 3, 0);  // agree, KL 0
  s.add(p.data(), q.data(), 3, 0);  // argmax 0 vs 1, KL ln2/4
  EXPECT_EQ(s.tokens, 2u);
  EXPECT_DOUBLE_EQ(s.top1_agree(), 0.5);
  EXPECT_NEAR(s.kl_max, std::log(2.0) / 4, 1e-7);
  EXPECT_NEAR(s.kl_mean(), std::log(2.0) / 8, 1e-7);
  const std::vector<float> tie = {1, 3, 3};
  EXPECT_EQ(argmax(tie.data(), 3), 1);  // the first of equal maxima
}

TEST(EvalText, HtmlToText) {
  EXPECT_EQ(html_to_text("<html><head><title>T</title></head><body><p>Hello,\n   <b>world</b>!</p>"
                         "<p>A&amp;B &lt;c&gt; &quot;q&quot;&nbsp;x<br>next</p><!-- gone <p> --></body>"),
            "Hello, world!\n\nA&B <c> \"q\" x\nnext\n");
  // Numeric entities to UTF-8; 128..159 read as Windows-1252 (133 = ellipsis).
  EXPECT_EQ(html_to_text("G&#246;ta&#133; &#x263A;"), "G\xC3\xB6ta\xE2\x80\xA6 \xE2\x98\xBA\n");
  // Not an entity: kept as is.
  EXPECT_EQ(html_to_text("a & b &bogus; c"), "a & b &bogus; c\n");
  EXPECT_EQ(html_to_text("<SCRIPT>var x = '<p>';</SCRIPT>text"), "text\n");
}

TEST(EvalText, DefaultTexts) {
  try {
    default_eval_text("poetry");
    FAIL() << "an unknown kind was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("prose, code"), std::string::npos) << e.what();
  }
  for (const char* kind : {"prose", "code"}) {
    try {
      const EvalText t = default_eval_text(kind);
      EXPECT_GT(t.text.size(), 200000u) << kind << ": " << t.source;
      EXPECT_EQ(t.text.find('\0'), std::string::npos) << kind;
      if (std::string(kind) == "prose") EXPECT_EQ(t.text.find("<p"), std::string::npos) << "an HTML tag is left";
    } catch (const Error& e) {
      // Not installed here: the message must name the package.
      const std::string msg = e.what();
      EXPECT_TRUE(msg.find("cfi-en") != std::string::npos || msg.find("nlohmann-json3-dev") != std::string::npos)
          << msg;
      std::printf("[  NOTE    ] %s\n", e.what());
    }
  }
}

// ---- With the real model ------------------------------------------------------------

std::string model_or_skip(const std::string& name) {
  for (const auto& m : known_models())
    if (m.name == name) {
      const std::string p = model_cache_dir() + "/" + m.file;
      if (std::filesystem::exists(p)) return p;
    }
  return "";
}

#define REQUIRE_MODEL(var, name)                                                       \
  const std::string var = model_or_skip(name);                                         \
  if (var.empty()) GTEST_SKIP() << "model " << name << " not in " << model_cache_dir() \
                                << " (run: tq models pull " << name << ")"

// From the preface of "Copyright Does Not Exist" (public domain; the default prose text).
constexpr const char* kSlice =
    "I'm going to start by telling you what it cost me to create this book: lots. Lots of time, and in "
    "actuality, lots of money. I'm not complaining. I've had plenty of both. A large part of the book was "
    "written during a phase of my studies at a vocational college. It's therefore more or less financed by "
    "the public means in the form of student financial aid that I received at the time. In a way, you could "
    "propose that due to this fact the book belongs to society. The question is whether society wants to "
    "have it.";

struct Fixture {
  std::unique_ptr<Model> model;
  std::vector<int32_t> ids;
  EvalOptions o;
};

Fixture load(const std::string& path, size_t n_tokens) {
  Fixture f;
  f.model = Model::load(path);
  const Tokenizer tok = Tokenizer::from_gguf(f.model->file());
  f.ids = tok.encode(kSlice, false);
  if (f.ids.size() > n_tokens) f.ids.resize(n_tokens);
  f.o.ctx = 32;
  f.o.threads = 2;
  f.o.chunk = 16;
  f.o.bos = tok.add_bos_default() ? tok.bos_id() : -1;
  return f;
}

TEST(EvalModel, DenseAgainstDenseIsExactAndTurbo4IsClose) {
  REQUIRE_MODEL(path, "smollm2-135m");
  Fixture f = load(path, 64);
  ASSERT_EQ(f.ids.size(), 64u);
  const auto rs = evaluate(*f.model, f.ids, {"dense-f16", "turbo4"}, f.o);
  ASSERT_EQ(rs.size(), 2u);
  const int span = f.o.ctx - (f.o.bos >= 0 ? 1 : 0);
  const size_t windows = (64 + span - 1) / span;
  EXPECT_EQ(rs[0].tokens, 64 - windows);  // each window's first text token has no context
  EXPECT_EQ(rs[0].kl_mean, 0.0);
  EXPECT_EQ(rs[0].kl_max, 0.0);
  EXPECT_EQ(rs[0].top1_agree, 1.0);
  EXPECT_EQ(rs[0].ppl, rs[0].ppl_dense);
  EXPECT_EQ(rs[0].kv_bytes, rs[0].kv_bytes_dense);
  const EvalResult& t = rs[1];
  std::printf("[  INFO    ] turbo4: ppl %.4f (dense %.4f), KL mean %.5f max %.4f, top-1 %.3f, KV %zu / %zu bytes\n",
              t.ppl, t.ppl_dense, t.kl_mean, t.kl_max, t.top1_agree, t.kv_bytes, t.kv_bytes_dense);
  EXPECT_EQ(t.ppl_dense, rs[0].ppl_dense);  // the same reference, the same tokens
  EXPECT_TRUE(std::isfinite(t.ppl) && std::isfinite(t.kl_mean) && std::isfinite(t.kl_max));
  EXPECT_GT(t.ppl_dense, 1.0);
  EXPECT_LT(t.ppl_dense, 200.0);
  EXPECT_LT(std::fabs(t.ppl / t.ppl_dense - 1.0), 0.2);
  EXPECT_GT(t.kl_mean, 0.0);
  EXPECT_LT(t.kl_mean, 0.1);
  EXPECT_GT(t.top1_agree, 0.8);
  EXPECT_LT(t.kv_bytes * 3, t.kv_bytes_dense);
}

TEST(EvalModel, PerLayerCompressesOneLayerAtATime) {
  REQUIRE_MODEL(path, "smollm2-135m");
  Fixture f = load(path, 31);
  const int L = f.model->config().n_layers;
  const auto dense = evaluate_per_layer(*f.model, f.ids, "dense-f16", f.o);
  ASSERT_EQ(int(dense.size()), L);
  for (const auto& r : dense) EXPECT_EQ(r.kl_mean, 0.0) << r.preset;
  const auto one = evaluate_per_layer(*f.model, f.ids, "turbo4", f.o);
  ASSERT_EQ(int(one.size()), L);
  EXPECT_EQ(one[3].preset, "turbo4@layer3");
  const double all = evaluate(*f.model, f.ids, {"turbo4"}, f.o)[0].kl_mean;
  double sum = 0;
  for (const auto& r : one) {
    EXPECT_GT(r.kl_mean, 0.0) << r.preset;  // each layer's compression changes the logits
    EXPECT_LT(r.kl_mean, all) << r.preset;  // but less than compressing every layer
    // Only one layer is compressed: about 1/L of the compressed cache's savings.
    EXPECT_GT(r.kv_bytes, r.kv_bytes_dense * (L - 2) / L);
    sum += r.kl_mean;
  }
  // KL of independent small perturbations roughly adds up over layers.
  EXPECT_GT(sum, 0.3 * all);
  EXPECT_LT(sum, 3.0 * all);
}

TEST(EvalModel, KStartCoveringEveryScoredPositionGivesZeroKl) {
  REQUIRE_MODEL(path, "smollm2-135m");
  Fixture f = load(path, 62);
  // The last position of a window predicts nothing, so with k_start = ctx - 1
  // every scored prediction is made before the upgrade: exactly the dense one.
  f.o.k_start = f.o.ctx - 1;
  const auto rs = evaluate(*f.model, f.ids, {"turbo4"}, f.o);
  EXPECT_EQ(rs[0].kl_max, 0.0);
  EXPECT_EQ(rs[0].ppl, rs[0].ppl_dense);
  EXPECT_LT(rs[0].kv_bytes * 3, rs[0].kv_bytes_dense);  // the layers were upgraded all the same
  // Half the window dense: between 0 and the k_start = 0 figure.
  f.o.k_start = 0;
  const double kl0 = evaluate(*f.model, f.ids, {"turbo4"}, f.o)[0].kl_mean;
  f.o.k_start = 16;
  const double kl16 = evaluate(*f.model, f.ids, {"turbo4"}, f.o)[0].kl_mean;
  EXPECT_GT(kl16, 0.0);
  EXPECT_LT(kl16, kl0);
}

TEST(EvalModel, OverlappingWindowsScoreEachTokenOnce) {
  REQUIRE_MODEL(path, "smollm2-135m");
  Fixture f = load(path, 40);
  f.o.stride = 8;
  const auto rs = evaluate(*f.model, f.ids, {"dense-f16"}, f.o);
  EXPECT_EQ(rs[0].tokens, 39u);  // every text token but the first
  EXPECT_EQ(rs[0].kl_max, 0.0);
}

TEST(EvalModel, BadOptionsAreRefusedNamingThem) {
  REQUIRE_MODEL(path, "smollm2-135m");
  Fixture f = load(path, 16);
  auto refuses = [&](EvalOptions o, std::vector<std::string> presets, const std::string& what) {
    try {
      evaluate(*f.model, f.ids, presets, o);
      ADD_FAILURE() << what << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  EvalOptions o = f.o;
  o.stride = 1000;
  refuses(o, {"turbo4"}, "stride");
  o = f.o;
  o.k_start = o.ctx;
  refuses(o, {"turbo4"}, "k_start");
  o = f.o;
  o.ctx = 1 << 20;
  refuses(o, {"turbo4"}, "context length");
  o = f.o;
  o.reference = "turbo4";
  refuses(o, {"turbo4"}, "not a dense preset");
  refuses(f.o, {"nope"}, "unknown KV preset 'nope'");
  refuses(f.o, {}, "no KV preset");
  const std::vector<int32_t> one = {f.ids[0]};
  try {
    evaluate(*f.model, one, {"turbo4"}, f.o);
    ADD_FAILURE() << "a 1-token text was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("at least 2"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace tq
