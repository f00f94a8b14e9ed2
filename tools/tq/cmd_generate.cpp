// tq generate: run a GGUF model with a KV cache preset, streaming the text.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_util.hpp"
#include "commands.hpp"
#include "turboquant/error.hpp"
#include "turboquant/generate.hpp"
#include "turboquant/model_registry.hpp"

namespace tq::cli {
namespace {

struct Args {
  std::string model = "smollm2-135m";
  std::string prompt;
  bool chat = false;
  std::string preset = "dense-f16";
  int k_start = 0, dense_window = cli::kDefaultDenseWindow, dense_prefix = cli::kDefaultDensePrefix;
  int n = 64, threads = 1, top_k = 0;
  std::string dense_layers;
  float temp = 0.0f, top_p = 1.0f;
  uint64_t seed = 0;
  bool json = false, allow_unsupported = false, swa_full = false;
  std::string compare;  // a second preset run on the same prompt, e.g. dense-f16
};


int run(const Args& a) {
  const std::string path = resolve_model(a.model);
  auto model = Model::load(path, a.allow_unsupported);
  const Tokenizer tok = Tokenizer::from_gguf(model->file());
  GenerateOptions o;
  o.preset = a.preset;
  o.k_start = a.k_start;
  o.dense_window = a.dense_window;
  o.dense_prefix = a.dense_prefix;
  o.dense_layers = parse_layer_list("--dense-layers", a.dense_layers, model->config().n_layers,
                                    &model->config().layer_local);
  o.swa_full = a.swa_full;
  o.max_tokens = a.n;
  o.chat = a.chat;
  o.threads = a.threads;
  o.sampler = {a.temp, a.top_k, a.top_p, a.seed};
  auto report = [&](const GenerateResult& r, const std::string& preset) {
    const double pre = r.prompt_tokens.size() / std::max(r.prefill_seconds, 1e-9);
    const double dec =
        r.tokens.size() > 1 ? (r.tokens.size() - 1) / std::max(r.decode_seconds, 1e-9) : 0.0;
    return nlohmann::json{{"model", model->config().name}, {"arch", model->config().arch},
                          {"preset", preset}, {"prompt_tokens", r.prompt_tokens.size()},
                          {"generated_tokens", r.tokens.size()}, {"text", r.text},
                          {"prefill_tok_s", pre}, {"decode_tok_s", dec}, {"kv_bytes", r.kv_bytes},
                          {"kv_bytes_dense", r.kv_bytes_dense}, {"dense_window", o.dense_window},
                          {"dense_prefix", o.dense_prefix}};
  };
  auto summary = [&](const nlohmann::json& j) {
    std::printf("[%s, %s cache] prompt %d tokens at %.1f tok/s, generated %d at %.1f tok/s; KV %zu bytes vs %zu dense f16 (%.2fx smaller)\n",
                j["arch"].get<std::string>().c_str(), j["preset"].get<std::string>().c_str(),
                j["prompt_tokens"].get<int>(), j["prefill_tok_s"].get<double>(), j["generated_tokens"].get<int>(),
                j["decode_tok_s"].get<double>(), j["kv_bytes"].get<size_t>(), j["kv_bytes_dense"].get<size_t>(),
                double(j["kv_bytes_dense"].get<size_t>()) / std::max<size_t>(1, j["kv_bytes"].get<size_t>()));
  };
  const bool stream = !a.json && a.compare.empty();
  if (stream) {
    std::printf("%s", a.prompt.c_str());
    std::fflush(stdout);
  }
  const GenerateResult r = generate(*model, tok, a.prompt, o, [&](const std::string& piece) {
    if (stream) {
      std::fputs(piece.c_str(), stdout);
      std::fflush(stdout);
    }
  });
  nlohmann::json j = report(r, a.preset);
  if (a.compare.empty()) {
    if (a.json) std::printf("%s\n", j.dump(2).c_str());
    else {
      std::printf("\n\n");
      summary(j);
    }
    return 0;
  }
  GenerateOptions ob = o;
  ob.preset = a.compare;
  ob.k_start = 0;
  ob.dense_window = 0;
  ob.dense_prefix = 0;
  ob.dense_layers.clear();
  const GenerateResult rb = generate(*model, tok, a.prompt, ob);
  const nlohmann::json jb = report(rb, a.compare);
  size_t same = 0;
  while (same < r.tokens.size() && same < rb.tokens.size() && r.tokens[same] == rb.tokens[same]) ++same;
  const bool agree = r.tokens == rb.tokens;
  if (a.json) {
    j["compare"] = jb;
    j["agree"] = agree;
    j["agree_tokens"] = same;
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("prompt: %s\n\n--- %s ---\n%s%s\n\n--- %s ---\n%s%s\n\n", a.prompt.c_str(), a.preset.c_str(),
              a.prompt.c_str(), r.text.c_str(), a.compare.c_str(), a.prompt.c_str(), rb.text.c_str());
  summary(j);
  summary(jb);
  std::printf("KV memory saved by %s: %zu of %zu bytes (%.1f%%)\n", a.preset.c_str(),
              rb.kv_bytes > r.kv_bytes ? rb.kv_bytes - r.kv_bytes : 0, rb.kv_bytes,
              100.0 * (1.0 - double(r.kv_bytes) / std::max<size_t>(1, rb.kv_bytes)));
  std::printf("greedy continuations %s (first %zu of %zu tokens identical)\n", agree ? "AGREE" : "DIFFER",
              same, std::max(r.tokens.size(), rb.tokens.size()));
  return 0;
}

}  // namespace

Runner add_generate(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand("generate", "Generate text with a GGUF model and a compressed KV cache");
  sub->add_option("-m,--model", a->model, "Model name (tq models list) or GGUF path")->capture_default_str();
  sub->add_option("-p,--prompt", a->prompt, "Prompt text")->required();
  sub->add_flag("--chat", a->chat, "Wrap the prompt in the model's chat template");
  sub->add_option("--kv", a->preset, "KV cache preset (tq kv-presets) or k=SPEC/v=SPEC, optionally with a layer policy "
                  "+LAYERS=PRESET (e.g. turbo3+global=turbo4-out: the full-attention layers in turbo4-out)")->capture_default_str();
  sub->add_option("--k-start", a->k_start, "Keep layers dense until they hold N tokens, then compress")
      ->check(CLI::Range(0, 1 << 30));
  sub->add_option("--dense-window", a->dense_window, "Keep the newest W tokens dense (0 = none)")
      ->check(CLI::Range(0, 1 << 30))->capture_default_str();
  sub->add_option("--dense-prefix", a->dense_prefix, "Keep the first S tokens dense, the attention sinks (0 = none)")
      ->check(CLI::Range(0, 1 << 30))->capture_default_str();
  sub->add_option("--dense-layers", a->dense_layers,
                  "Comma list of layers kept dense (negative: from the end; 'local' / 'global': the model's "
                  "sliding-window / full-attention layers)");
  sub->add_flag("--swa-full", a->swa_full,
                "Sliding-window layers keep every token (default: they free what their window no longer sees)");
  sub->add_option("-n,--n-tokens", a->n, "Tokens to generate")->check(CLI::Range(0, 1 << 20))->capture_default_str();
  sub->add_option("--threads", a->threads, "Threads (0 = all cores)")->check(CLI::Range(0, 1024))->capture_default_str();
  sub->add_option("--temp", a->temp, "Sampling temperature (0 = greedy)")->check(CLI::Range(0.0f, 100.0f));
  sub->add_option("--top-k", a->top_k, "Top-k (0 = off)")->check(CLI::Range(0, 1 << 20));
  sub->add_option("--top-p", a->top_p, "Top-p in (0, 1]")->check(CLI::Range(0.0f, 1.0f));
  sub->add_option("--seed", a->seed, "Sampling seed");
  sub->add_flag("--json", a->json, "Print one JSON object instead of streaming");
  sub->add_option("--compare", a->compare,
                  "Also run this preset (e.g. dense-f16) and show both texts, the KV saved and whether they agree");
  sub->add_flag("--allow-unsupported", a->allow_unsupported, "Run an unsupported architecture as llama (experimental)");
  return [a] { return run(*a); };
}

}  // namespace tq::cli
