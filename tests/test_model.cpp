// Model runtime: the architecture gate, and (when the models are pulled)
// batch vs token-by-token consistency and a sane greedy continuation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

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

}  // namespace
}  // namespace tq
