// tq model-bench: prefill and decode tokens/s of a model with KV presets at
// given context depths (like llama-bench's pp N and tg M @ depth N).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_util.hpp"
#include "commands.hpp"
#include "turboquant/error.hpp"
#include "turboquant/model.hpp"
#include "turboquant/model_registry.hpp"
#include "turboquant/rng.hpp"

namespace tq::cli {
namespace {

struct Args {
  std::string model = "smollm2-135m", presets = "dense-f16,paper_mse", contexts = "512", threads = "1";
  int decode = 32, batch = 512;
  bool json = false;
};


int run(const Args& a) {
  auto model = Model::load(resolve_model(a.model));
  const ModelConfig& c = model->config();
  const std::vector<int> contexts = parse_int_list("--context", a.contexts);
  const std::vector<int> threads = parse_int_list("--threads", a.threads);
  for (int th : threads) TQ_REQUIRE(th >= 0 && th <= 1024, "--threads: ", th, " is outside 0..1024");
  const std::vector<std::string> presets = split_presets(a.presets);
  for (const auto& p : presets) find_kv_preset(p);
  for (int n : contexts)
    TQ_REQUIRE(n >= 1 && n + a.decode <= c.context_length, "--context ", n, " + ", a.decode,
               " decode tokens exceeds the model's context length ", c.context_length);
  nlohmann::json out = nlohmann::json::array();
  if (!a.json)
    std::printf("%-14s %-12s %7s %7s %12s %12s %12s\n", "model", "kv", "context", "threads", "prefill t/s",
                "decode t/s", "KV MiB");
  Rng rng(1);
  for (int n : contexts) {
    std::vector<int32_t> prompt(n);
    for (auto& t : prompt) t = int32_t(rng.below(uint64_t(c.vocab)));
    for (int th : threads)
      for (const auto& preset : presets) {
        KvCache cache(model->cache_config(preset));
        const int seq = cache.add_sequence();
        std::vector<float> logits(c.vocab);
        const auto t0 = std::chrono::steady_clock::now();
        for (int pos = 0; pos < n; pos += a.batch) {
          const int k = std::min(a.batch, n - pos);
          model->forward(cache, seq, prompt.data() + pos, k, pos, logits.data(), th);
        }
        const auto t1 = std::chrono::steady_clock::now();
        int32_t tok = prompt.back();
        for (int i = 0; i < a.decode; ++i) {
          tok = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
          model->forward(cache, seq, &tok, 1, n + i, logits.data(), th);
        }
        const auto t2 = std::chrono::steady_clock::now();
        const double pre = n / std::chrono::duration<double>(t1 - t0).count();
        const double dec = a.decode / std::chrono::duration<double>(t2 - t1).count();
        const double kv = cache.memory().used.total() / 1048576.0;
        if (a.json)
          out.push_back({{"model", c.name}, {"arch", c.arch}, {"kv", preset}, {"context", n}, {"threads", th},
                         {"prefill_tok_s", pre}, {"decode_tok_s", dec}, {"kv_mib", kv}});
        else
          std::printf("%-14s %-12s %7d %7d %12.1f %12.1f %12.2f\n", c.arch.c_str(), preset.c_str(), n, th, pre,
                      dec, kv);
        std::fflush(stdout);
      }
  }
  if (a.json) std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

}  // namespace

Runner add_model_bench(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand("model-bench", "Prefill and decode tokens/s per KV preset, context and thread count");
  sub->add_option("-m,--model", a->model, "Model name or GGUF path")->capture_default_str();
  sub->add_option("--kv", a->presets, "Comma list of KV presets")->capture_default_str();
  sub->add_option("--context", a->contexts, "Comma list of prompt lengths (decode runs at that depth)")->capture_default_str();
  sub->add_option("--threads", a->threads, "Comma list of thread counts")->capture_default_str();
  sub->add_option("--decode", a->decode, "Decode tokens timed after the prefill")->check(CLI::Range(1, 4096))->capture_default_str();
  sub->add_option("--batch", a->batch, "Prefill batch (tokens per forward call)")->check(CLI::Range(1, 65536))->capture_default_str();
  sub->add_flag("--json", a->json, "Print one JSON array");
  return [a] { return run(*a); };
}

}  // namespace tq::cli
