// tq logits: the model's logits on a prompt (teacher-forced) and its greedy
// continuation, for cross-checks against other implementations.
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "turboquant/error.hpp"
#include "turboquant/model.hpp"
#include "turboquant/model_registry.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq::cli {
namespace {

struct Args {
  std::string model = "smollm2-135m", prompt, preset = "dense-f32", out;
  int greedy = 32, threads = 1;
  bool add_bos = true;
};

int run(const Args& a) {
  auto model = Model::load(resolve_model(a.model));
  const Tokenizer tok = Tokenizer::from_gguf(model->file());
  const std::vector<int32_t> ids = tok.encode(a.prompt, a.add_bos && tok.bos_id() >= 0);
  TQ_REQUIRE(!ids.empty(), "the prompt encodes to no tokens");
  const int V = model->config().vocab, n = int(ids.size());
  KvCache cache(model->cache_config(a.preset));
  const int seq = cache.add_sequence();
  std::vector<float> logits(size_t(n) * V);
  model->forward(cache, seq, ids.data(), n, 0, logits.data(), a.threads, /*all_logits=*/true);
  nlohmann::json j;
  j["model"] = model->config().name;
  j["arch"] = model->config().arch;
  j["preset"] = a.preset;
  j["prompt"] = a.prompt;
  j["tokens"] = ids;
  j["vocab"] = V;
  nlohmann::json rows = nlohmann::json::array();
  for (int t = 0; t < n; ++t)
    rows.push_back(std::vector<float>(logits.begin() + size_t(t) * V, logits.begin() + size_t(t + 1) * V));
  j["logits"] = rows;
  std::vector<float> last(logits.end() - V, logits.end());
  std::vector<int32_t> gen;
  int pos = n;
  for (int i = 0; i < a.greedy; ++i) {
    int32_t best = 0;
    for (int v = 1; v < V; ++v)
      if (last[v] > last[best]) best = v;
    gen.push_back(best);
    model->forward(cache, seq, &best, 1, pos++, last.data(), a.threads);
  }
  j["greedy"] = gen;
  j["greedy_text"] = tok.decode(gen);
  if (a.out.empty()) {
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::ofstream(a.out) << j.dump();
    std::fprintf(stderr, "wrote %s: %d positions x %d logits, greedy: %s\n", a.out.c_str(), n, V,
                 j["greedy_text"].get<std::string>().c_str());
  }
  return 0;
}

}  // namespace

Runner add_logits(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand("logits", "Teacher-forced logits of a prompt and a greedy continuation, as JSON");
  sub->add_option("-m,--model", a->model, "Model name or GGUF path")->capture_default_str();
  sub->add_option("-p,--prompt", a->prompt, "Prompt text")->required();
  sub->add_option("--kv", a->preset, "KV cache preset")->capture_default_str();
  sub->add_option("--greedy", a->greedy, "Greedy tokens to generate")->check(CLI::Range(0, 4096))->capture_default_str();
  sub->add_option("--threads", a->threads, "Threads (0 = all)")->check(CLI::Range(0, 1024));
  sub->add_option("-o,--out", a->out, "Write the JSON here instead of stdout");
  sub->add_flag("!--no-bos", a->add_bos, "Do not prepend BOS");
  return [a] { return run(*a); };
}

}  // namespace tq::cli
