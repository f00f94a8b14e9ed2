// Model runtime: the architecture gate, and (when the models are pulled)
// batch vs token-by-token consistency and a sane greedy continuation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>

#include "turboquant/error.hpp"
#include "turboquant/generate.hpp"
#include "turboquant/model.hpp"
#include "turboquant/model_registry.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq {
namespace {

// A GGUF with only general.architecture = arch.
std::string write_arch_only_gguf(const std::string& arch) {
  std::vector<uint8_t> b;
  auto put = [&](const void* p, size_t n) { b.insert(b.end(), (const uint8_t*)p, (const uint8_t*)p + n); };
  const uint32_t magic = 0x46554747, ver = 3, str_type = 8;
  const uint64_t n_t = 0, n_kv = 1;
  put(&magic, 4);
  put(&ver, 4);
  put(&n_t, 8);
  put(&n_kv, 8);
  const std::string key = "general.architecture";
  uint64_t len = key.size();
  put(&len, 8);
  put(key.data(), key.size());
  put(&str_type, 4);
  len = arch.size();
  put(&len, 8);
  put(arch.data(), arch.size());
  const std::string path = (std::filesystem::temp_directory_path() / ("tq-arch-" + arch + ".gguf")).string();
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), b.size());
  return path;
}

TEST(Model, UnsupportedArchitectureIsRefusedNamingIt) {
  const std::string path = write_arch_only_gguf("qwen2");
  try {
    Model::load(path);
    FAIL() << "qwen2 was accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'qwen2'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("llama, gemma, gemma2, gemma3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("--allow-unsupported"), std::string::npos) << msg;
  }
  // With the override it gets past the gate (and then fails on the missing tensors/metadata).
  EXPECT_THROW(Model::load(path, true), Error);
  std::filesystem::remove(path);
}

std::string model_or_skip(const std::string& name) {
  for (const auto& m : known_models())
    if (m.name == name) {
      const std::string p = model_cache_dir() + "/" + m.file;
      if (std::filesystem::exists(p)) return p;
      return "";
    }
  return "";
}

#define REQUIRE_MODEL(var, name)                                                              \
  const std::string var = model_or_skip(name);                                                \
  if (var.empty()) GTEST_SKIP() << "model " << name << " not in " << model_cache_dir()        \
                                << " (run: tq models pull " << name << ")"

TEST(Model, BatchedPrefillEqualsTokenByToken) {
  for (const char* name : {"smollm2-135m", "gemma3-270m"}) {
    REQUIRE_MODEL(path, name);
    auto m = Model::load(path);
    const Tokenizer tok = Tokenizer::from_gguf(m->file());
    const std::vector<int32_t> ids = tok.encode("The quick brown fox jumps over the lazy dog", true);
    const int V = m->config().vocab, n = int(ids.size());
    KvCache a(m->cache_config("dense-f32")), b(m->cache_config("dense-f32"));
    const int sa = a.add_sequence(), sb = b.add_sequence();
    std::vector<float> all(size_t(n) * V), one(V);
    m->forward(a, sa, ids.data(), n, 0, all.data(), 2, /*all_logits=*/true);
    for (int t = 0; t < n; ++t) {
      m->forward(b, sb, &ids[t], 1, t, one.data(), 1);
      double err = 0, ref = 0;
      for (int i = 0; i < V; ++i) {
        err = std::max(err, double(std::fabs(one[i] - all[size_t(t) * V + i])));
        ref = std::max(ref, double(std::fabs(one[i])));
      }
      EXPECT_LT(err, 1e-3 * ref) << name << " token " << t;
    }
  }
}

TEST(Model, LayerPolicyNamesResolveToTheModelsLayers) {
  {
    REQUIRE_MODEL(path, "gemma3-270m");  // every 6th layer attends globally
    auto m = Model::load(path);
    const KvCacheConfig c = m->cache_config("turbo3+global=turbo4-out");
    std::vector<int> layers;
    for (const auto& f : c.layer_formats) layers.push_back(f.layer);
    EXPECT_EQ(layers, (std::vector<int>{5, 11, 17}));
    EXPECT_EQ(to_string(c.k_format_of(5)), to_string(parse_format("tq-mse:b=4,hi=12.5%,hb=6")));
    EXPECT_EQ(to_string(c.k_format_of(4)), "tq-mse:b=3");
    EXPECT_EQ(m->cache_config("turbo3+local=turbo4").layer_formats.size(), 15u);
  }
  {
    REQUIRE_MODEL(path, "smollm2-135m");  // no sliding window: every layer is global
    auto m = Model::load(path);
    EXPECT_EQ(m->cache_config("turbo3+global=turbo4").layer_formats.size(), size_t(m->config().n_layers));
    try {
      m->cache_config("turbo3+local=turbo4");
      ADD_FAILURE() << "a policy on no layers was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("this model has no 'local' layers"), std::string::npos) << e.what();
    }
  }
}

TEST(Model, SlidingWindowLayersFreeWhatTheyNoLongerSeeWithTheSameLogits) {
  // Gemma 3's local layers (window 512) through a default cache, which frees
  // their old pages, and through a --swa-full one: the same logits at every
  // step of a 700-position run (chunked prefill, then decode), fewer bytes,
  // and the global layers keep every position. dense-f32 so that "the same"
  // can be tight: the two caches split attention over pages differently (a
  // different summation order), and through a quantized cache a last-bit
  // difference can flip a code in a later layer (turbo4 moves these logits
  // by up to ~50 % between 1 and 2 threads on this random token stream).
  REQUIRE_MODEL(path, "gemma3-270m");
  auto m = Model::load(path);
  const ModelConfig& c = m->config();
  ASSERT_EQ(c.sliding_window, 512);
  KvCacheConfig swa = m->cache_config("dense-f32"), full = m->cache_config("dense-f32", true);
  ASSERT_EQ(swa.sliding_window.size(), size_t(c.n_layers));
  EXPECT_EQ(swa.sliding_window[5], 0);
  EXPECT_EQ(swa.sliding_window[4], 512);
  EXPECT_TRUE(full.sliding_window.empty());
  EXPECT_EQ(swa.page_tokens, 64);  // 1/8 of the window: a local layer holds <= 512 + 64 tokens
  EXPECT_EQ(full.page_tokens, 256);
  full.page_tokens = 64;  // the same pages, so that only the eviction differs
  KvCache a(swa), b(full);
  const int sa = a.add_sequence(), sb = b.add_sequence();
  std::vector<int32_t> tokens(700);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t(1000 + (i * 7919) % 20000);
  std::vector<float> la(size_t(c.vocab)), lb(la.size());
  double worst = 0;
  for (int pos = 0; pos < 700;) {
    const int n = pos < 640 ? 128 : 1;  // prefill chunks, then decode steps
    m->forward(a, sa, tokens.data() + pos, n, pos, la.data(), 2);
    m->forward(b, sb, tokens.data() + pos, n, pos, lb.data(), 2);
    pos += n;
    double err = 0, ref = 0;
    for (size_t i = 0; i < la.size(); ++i) {
      err += (la[i] - lb[i]) * double(la[i] - lb[i]);
      ref += double(lb[i]) * lb[i];
    }
    worst = std::max(worst, std::sqrt(err / ref));
  }
  EXPECT_LE(worst, 1e-4);
  EXPECT_EQ(a.first_stored(sa, 5), 0);
  EXPECT_GT(a.first_stored(sa, 4), 0);
  EXPECT_GT(a.memory().evicted, 0u);
  EXPECT_LT(a.bytes_allocated(), b.bytes_allocated());
}

TEST(Model, GreedyContinuationIsSane) {
  REQUIRE_MODEL(path, "smollm2-135m");
  auto m = Model::load(path);
  const Tokenizer tok = Tokenizer::from_gguf(m->file());
  GenerateOptions o;
  o.max_tokens = 4;
  o.threads = 2;
  for (const char* preset : {"dense-f16", "paper_mse", "turbo4"}) {
    o.preset = preset;
    const GenerateResult r = generate(*m, tok, "The capital of France is", o);
    EXPECT_EQ(r.text.substr(0, 6), " Paris") << preset << ": " << r.text;
    EXPECT_GT(r.kv_bytes, 0u);
    if (std::string(preset) != "dense-f16") EXPECT_LT(r.kv_bytes * 3, r.kv_bytes_dense) << preset;  // >= 3.7x at head_dim 64
  }
}

// Logits that Hugging Face transformers computes on the same GGUF files
// (scripts/compare_transformers.py wrote them): ours must match to 1e-3.
TEST(Model, MatchesTransformersGoldenLogits) {
  std::ifstream in(std::string(TQ_TEST_DATA_DIR) + "/golden_logits.json");
  ASSERT_TRUE(in) << "missing tests/data/golden_logits.json";
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Minimal parse of the known structure: rows of {model, prompt, tokens, position, ids, logits}.
  auto array_after = [&](size_t from, const std::string& key, size_t* end) {
    const size_t k = text.find("\"" + key + "\"", from);
    const size_t open = text.find('[', k), close = text.find(']', open);
    std::vector<double> v;
    std::string body = text.substr(open + 1, close - open - 1);
    for (char& c : body)
      if (c == ',') c = ' ';
    std::istringstream ss(body);
    double x;
    while (ss >> x) v.push_back(x);
    *end = close;
    return v;
  };
  auto string_after = [&](size_t from, const std::string& key) {
    const size_t k = text.find("\"" + key + "\"", from);
    const size_t q1 = text.find('"', text.find(':', k) + 1), q2 = text.find('"', q1 + 1);
    return text.substr(q1 + 1, q2 - q1 - 1);
  };
  int checked = 0;
  std::map<std::string, std::unique_ptr<Model>> models;
  for (size_t at = text.find("\"model\""); at != std::string::npos; at = text.find("\"model\"", at + 1)) {
    const std::string name = string_after(at, "model");
    const std::string path = model_or_skip(name);
    if (path.empty()) GTEST_SKIP() << "model " << name << " not pulled (tq models pull " << name << ")";
    if (!models.count(name)) models[name] = Model::load(path);
    const Model& m = *models[name];
    size_t end = at;
    const std::vector<double> tokens_d = array_after(at, "tokens", &end);
    const int position = std::stoi(text.substr(text.find(':', text.find("\"position\"", at)) + 1));
    const std::vector<double> ids = array_after(at, "ids", &end);
    const std::vector<double> want = array_after(at, "logits", &end);
    ASSERT_EQ(ids.size(), want.size());
    std::vector<int32_t> tokens(tokens_d.begin(), tokens_d.begin() + position + 1);
    KvCache cache(m.cache_config("dense-f32"));
    const int seq = cache.add_sequence();
    std::vector<float> logits(m.config().vocab);
    m.forward(cache, seq, tokens.data(), int(tokens.size()), 0, logits.data(), 2);
    for (size_t i = 0; i < ids.size(); ++i)
      EXPECT_NEAR(logits[size_t(ids[i])], want[i], 1e-3) << name << " position " << position << " id " << ids[i];
    ++checked;
    at = end;
  }
  EXPECT_EQ(checked, 12);
}

}  // namespace
}  // namespace tq
