// tq eval: perplexity, KL(dense || preset) and top-1 agreement of KV presets
// on a real text, teacher-forced in windows of --ctx tokens.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_util.hpp"
#include "commands.hpp"
#include "turboquant/error.hpp"
#include "turboquant/eval.hpp"
#include "turboquant/kv_cache.hpp"
#include "turboquant/model.hpp"
#include "turboquant/model_registry.hpp"
#include "turboquant/parallel.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq::cli {
namespace {

struct Args {
  std::string model = "smollm2-135m";
  std::string text = "prose";
  std::string presets = "turbo4,paper_mse";
  std::string reference = "dense-f16";
  std::string dense_layers;
  int ctx = 1024, stride = 0, k_start = 0, max_tokens = 0, threads = 0, chunk = 64, dense_window = 0;
  bool json = false, allow_unsupported = false;
};


// "prose" / "code": the installed defaults; anything else is a file.
EvalText load_text(const std::string& arg) {
  if (arg == "prose" || arg == "code") return default_eval_text(arg);
  std::ifstream in(arg, std::ios::binary);
  TQ_REQUIRE(in, "--text: cannot read '", arg, "' (a text file, or 'prose' / 'code' for the defaults)");
  EvalText t;
  t.text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  t.source = arg;
  return t;
}

int run(const Args& a) {
  const std::vector<std::string> presets = split_presets(a.presets);
  TQ_REQUIRE(!presets.empty(), "--kv: no preset given (e.g. --kv turbo4,paper_mse)");
  for (const auto& p : presets) find_kv_preset(p);  // unknown names fail before the model loads
  find_kv_preset(a.reference);

  auto model = Model::load(resolve_model(a.model), a.allow_unsupported);
  const ModelConfig& c = model->config();
  const Tokenizer tok = Tokenizer::from_gguf(model->file());
  EvalText text = load_text(a.text);
  // The BPE tokenizer need not see a whole book to give --max-tokens tokens:
  // 16 bytes a token is far more than English or C++ needs. Cut at a space so
  // that no word is split; the token count is cut exactly below.
  const size_t keep = size_t(a.max_tokens) * 16;
  if (a.max_tokens > 0 && text.text.size() > keep) {
    const size_t cut = text.text.find_last_of(" \n", keep);
    text.text.resize(cut == std::string::npos ? keep : cut);
  }
  std::vector<int32_t> ids = tok.encode(text.text, /*add_bos=*/false);
  if (a.max_tokens > 0 && ids.size() > size_t(a.max_tokens)) ids.resize(size_t(a.max_tokens));

  EvalOptions o;
  o.ctx = a.ctx;
  o.stride = a.stride;
  o.k_start = a.k_start;
  o.chunk = a.chunk;
  o.threads = a.threads > 0 ? a.threads : hardware_threads();
  o.bos = tok.add_bos_default() ? tok.bos_id() : -1;
  o.reference = a.reference;
  o.dense_window = a.dense_window;
  o.dense_layers = parse_layer_list("--dense-layers", a.dense_layers, c.n_layers);
  const bool bar = isatty(fileno(stderr));
  const auto t0 = std::chrono::steady_clock::now();
  if (bar)
    o.progress = [&](size_t done, size_t total) {
      const double f = double(done) / double(std::max<size_t>(total, 1));
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const int w = 30, k = int(f * w);
      std::fprintf(stderr, "\r[%s%s] %5.1f%% %zu/%zu positions, %.0f s, ETA %.0f s ", std::string(k, '#').c_str(),
                   std::string(w - k, '.').c_str(), 100 * f, done, total, s, f > 0 ? s * (1 - f) / f : 0.0);
      std::fflush(stderr);
    };
  if (!a.json)
    std::fprintf(stderr, "tq eval: %s, %zu tokens of %s; ctx %d, stride %d, k_start %d, reference %s, %d threads\n",
                 c.name.c_str(), ids.size(), text.source.c_str(), a.ctx, a.stride, a.k_start, a.reference.c_str(),
                 o.threads);
  const std::vector<EvalResult> rs = evaluate(*model, ids, presets, o);
  if (bar) std::fprintf(stderr, "\n");

  if (a.json) {
    nlohmann::ordered_json out = nlohmann::ordered_json::array();  // keys in the documented order
    for (const auto& r : rs)
      out.push_back({{"preset", r.preset}, {"ppl", r.ppl}, {"ppl_dense", r.ppl_dense},
                     {"ppl_delta_pct", r.ppl_delta_pct}, {"kl_mean", r.kl_mean}, {"kl_max", r.kl_max},
                     {"top1_agree", r.top1_agree}, {"kv_bytes", r.kv_bytes}, {"kv_bytes_dense", r.kv_bytes_dense},
                     {"tokens", r.tokens}});
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::printf("%-14s %9s %9s %8s %10s %9s %7s %11s %7s\n", "preset", "ppl", "ppl_dense", "dppl%", "KL mean",
              "KL max", "top1", "KV bytes", "ratio");
  for (const auto& r : rs)
    std::printf("%-14s %9.4f %9.4f %+8.3f %10.6f %9.4f %7.4f %11zu %6.2fx\n", r.preset.c_str(), r.ppl, r.ppl_dense,
                r.ppl_delta_pct, r.kl_mean, r.kl_max, r.top1_agree, r.kv_bytes,
                double(r.kv_bytes_dense) / double(std::max<size_t>(r.kv_bytes, 1)));
  std::printf("%zu scored tokens; dense reference %s, %zu KV bytes per window\n", rs.front().tokens,
              a.reference.c_str(), rs.front().kv_bytes_dense);
  return 0;
}

}  // namespace

Runner add_eval(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand(
      "eval", "Perplexity, KL(dense || preset) and top-1 agreement of KV presets on a text (teacher-forced)");
  sub->add_option("-m,--model", a->model, "Model name (tq models list) or GGUF path")->capture_default_str();
  sub->add_option("--text", a->text,
                  "Text file, or 'prose' (the book in Debian package cfi-en) or 'code' (nlohmann-json3-dev headers)")
      ->capture_default_str();
  sub->add_option("--kv", a->presets, "Comma list of KV presets (tq kv-presets) or k=SPEC/v=SPEC")
      ->capture_default_str();
  sub->add_option("--ref", a->reference, "Dense reference: dense-f16, dense-bf16 or dense-f32")
      ->check(CLI::IsMember({"dense-f16", "dense-bf16", "dense-f32"}))
      ->capture_default_str();
  sub->add_option("--ctx", a->ctx, "Positions per window (BOS included)")->check(CLI::Range(2, 1 << 20))
      ->capture_default_str();
  sub->add_option("--stride", a->stride, "Text tokens between window starts (0 = one full window, no overlap)")
      ->check(CLI::Range(0, 1 << 20));
  sub->add_option("--k-start", a->k_start, "Positions of each window attended densely before compression")
      ->check(CLI::Range(0, 1 << 20));
  sub->add_option("--max-tokens", a->max_tokens, "Use only the first T tokens of the text (0 = all)")
      ->check(CLI::Range(0, 1 << 30));
  sub->add_option("--threads", a->threads, "Threads (0 = all cores)")->check(CLI::Range(0, 1024))
      ->capture_default_str();
  sub->add_option("--chunk", a->chunk, "Positions per forward call")->check(CLI::Range(1, 4096))
      ->capture_default_str();
  sub->add_option("--dense-window", a->dense_window, "Keep the newest W tokens dense in every preset")
      ->check(CLI::Range(0, 1 << 30));
  sub->add_option("--dense-layers", a->dense_layers, "Comma list of layers kept dense (negative: from the end)");
  sub->add_flag("--json", a->json, "Print a JSON array, one object per preset");
  sub->add_flag("--allow-unsupported", a->allow_unsupported, "Run an unsupported architecture as llama (experimental)");
  return [a] { return run(*a); };
}

}  // namespace tq::cli
