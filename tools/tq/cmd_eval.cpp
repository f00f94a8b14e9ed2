// tq eval: perplexity, KL(dense || preset) and top-1 agreement of KV presets
// on a real text, teacher-forced in windows of --ctx tokens; with --needle,
// pass-key retrieval (needle in a haystack) at growing prompt lengths.
#include <unistd.h>

#include <algorithm>
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
#include "turboquant/needle.hpp"
#include "turboquant/parallel.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq::cli {

std::function<void(size_t, size_t)> progress_bar(const char* unit) {
  if (!isatty(fileno(stderr))) return {};
  const auto t0 = std::chrono::steady_clock::now();
  return [t0, unit](size_t done, size_t total) {
    const double f = double(done) / double(std::max<size_t>(total, 1));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const int w = 30, k = int(f * w);
    std::fprintf(stderr, "\r[%s%s] %5.1f%% %zu/%zu %s, %.0f s, ETA %.0f s ", std::string(k, '#').c_str(),
                 std::string(w - k, '.').c_str(), 100 * f, done, total, unit, s, f > 0 ? s * (1 - f) / f : 0.0);
    std::fflush(stderr);
  };
}

namespace {

struct Args {
  std::string model = "smollm2-135m";
  std::string text = "prose";
  std::string presets = "turbo4,paper_mse";
  std::string reference = "dense-f16";
  std::string dense_layers;
  int ctx = 1024, stride = 0, k_start = 0, max_tokens = 0, threads = 0, chunk = 64;
  int dense_window = cli::kDefaultDenseWindow, dense_prefix = cli::kDefaultDensePrefix;
  bool json = false, allow_unsupported = false, swa_full = false;
  // --needle
  bool per_layer = false;
  bool needle = false, needle_chat = false;
  std::string needle_lengths, needle_depths = "0,25,50,75,100", needle_filler = "prose";
  int needle_trials = 1, needle_answer = 12;
  uint64_t seed = 1;
};

// Default needle lengths: powers of two from 1024 up to the model's context,
// capped at 8192 (a CPU run of one preset at 8192 positions already takes
// minutes on a 135M model); --needle-lengths goes up to the full context.
std::vector<int> default_needle_lengths(int context_length) {
  const int cap = std::min(context_length > 0 ? context_length : 8192, 8192);
  std::vector<int> out;
  for (int L = 1024; L <= cap; L *= 2) out.push_back(L);
  if (out.empty()) out.push_back(cap);
  return out;
}

std::string pct(int correct, int total) {
  char b[32];
  std::snprintf(b, sizeof b, "%3.0f%% %d/%d", total ? 100.0 * correct / total : 0.0, correct, total);
  return b;
}

// Width of a table's preset column: at least 14, wider for long names (a
// layer policy makes long ones). name(row) gives a row's preset.
template <class Rows, class Name>
int preset_column_width(const Rows& rows, Name name) {
  int w = 14;
  for (const auto& r : rows) w = std::max(w, int(name(r).size()));
  return w;
}

int run_needle(const Args& a) {
  std::vector<std::string> presets = split_presets(a.presets);
  TQ_REQUIRE(!presets.empty(), "--kv: no preset given (e.g. --kv turbo4,paper_mse)");
  for (const auto& p : presets) find_kv_preset(p);  // unknown names fail before the model loads
  find_kv_preset(a.reference);
  // The dense reference first, on the same prompts.
  presets.erase(std::remove(presets.begin(), presets.end(), a.reference), presets.end());
  presets.insert(presets.begin(), a.reference);
  std::vector<double> depths;
  for (int d : parse_int_list("--needle-depths", a.needle_depths)) {
    TQ_REQUIRE(d >= 0 && d <= 100, "--needle-depths: ", d, " is outside 0..100 (percent)");
    depths.push_back(d);
  }
  TQ_REQUIRE(a.needle_filler == "prose" || a.needle_filler == "repeat",
             "--needle-filler: '", a.needle_filler, "' (valid: prose, repeat)");
  const std::string filler = a.needle_filler == "prose" ? default_eval_text("prose").text : kNeedleRepeatFiller;

  auto model = Model::load(resolve_model(a.model), a.allow_unsupported);
  const ModelConfig& c = model->config();
  const Tokenizer tok = Tokenizer::from_gguf(model->file());
  NeedleOptions o;
  o.lengths = a.needle_lengths.empty() ? default_needle_lengths(c.context_length)
                                       : parse_int_list("--needle-lengths", a.needle_lengths);
  o.depths = depths;
  o.trials = a.needle_trials;
  o.seed = a.seed;
  o.answer_tokens = a.needle_answer;
  o.chat = a.needle_chat;
  o.k_start = a.k_start;
  o.threads = a.threads > 0 ? a.threads : hardware_threads();
  o.dense_window = a.dense_window;
  o.dense_prefix = a.dense_prefix;
  o.dense_layers = parse_layer_list("--dense-layers", a.dense_layers, c.n_layers, &c.layer_local);
  o.swa_full = a.swa_full;
  o.progress = progress_bar("positions");
  const bool chat = o.chat && tok.chat_format() != Tokenizer::ChatFormat::none;
  std::string lengths_s, depths_s;
  for (int L : o.lengths) lengths_s += (lengths_s.empty() ? "" : ",") + std::to_string(L);
  for (double d : o.depths) depths_s += (depths_s.empty() ? "" : ",") + std::to_string(int(d));
  if (!a.json)
    std::fprintf(stderr, "tq eval --needle: %s, %s filler, %s prompt, lengths %s, depths %s %%, %d trial(s), "
                 "seed %llu, k_start %d, dense window %d, dense prefix %d, %d threads\n", c.name.c_str(),
                 a.needle_filler.c_str(), chat ? "chat-template" : "plain", lengths_s.c_str(), depths_s.c_str(),
                 o.trials, (unsigned long long)o.seed, o.k_start, o.dense_window, o.dense_prefix, o.threads);
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<NeedleTrial> trials = needle_run(*model, tok, filler, presets, o);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (o.progress) std::fprintf(stderr, "\n");
  const auto cells = needle_summary(trials, false);
  const auto by_depth = needle_summary(trials, true);

  if (a.json) {
    nlohmann::ordered_json j;
    j["model"] = c.name;
    j["filler"] = a.needle_filler;
    j["prompt"] = chat ? "chat" : "plain";
    j["seed"] = o.seed;
    j["trials"] = o.trials;
    j["k_start"] = o.k_start;
    j["dense_window"] = o.dense_window;
    j["dense_prefix"] = o.dense_prefix;
    j["dense_layers"] = o.dense_layers;
    j["swa_full"] = o.swa_full;
    j["lengths"] = o.lengths;
    j["depths"] = o.depths;
    j["seconds"] = secs;
    j["results"] = nlohmann::ordered_json::array();
    for (const auto& cell : cells) {
      nlohmann::ordered_json r = {{"preset", cell.preset}, {"length", cell.length},
                                  {"accuracy", cell.accuracy()}, {"correct", cell.correct},
                                  {"total", cell.total}, {"kv_bits_per_coord", cell.kv_bits_per_coord},
                                  {"by_depth", nlohmann::ordered_json::array()}};
      for (const auto& d : by_depth)
        if (d.preset == cell.preset && d.length == cell.length)
          r["by_depth"].push_back({{"depth", d.depth}, {"accuracy", d.accuracy()}, {"correct", d.correct},
                                   {"total", d.total}});
      j["results"].push_back(r);
    }
    j["trials_detail"] = nlohmann::ordered_json::array();
    for (const auto& t : trials)
      j["trials_detail"].push_back({{"preset", t.preset}, {"length", t.length}, {"depth", t.depth},
                                    {"depth_actual", t.depth_actual}, {"trial", t.trial},
                                    {"passkey", t.passkey}, {"answer", t.answer}, {"correct", t.correct},
                                    {"kv_bytes", t.kv_bytes}, {"positions", t.positions},
                                    {"kv_bits_per_coord", t.kv_bits_per_coord}});
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  // Accuracy per preset and length, then per depth.
  const int w = preset_column_width(presets, [](const std::string& p) -> const std::string& { return p; });
  std::printf("%-*s", w, "preset");
  for (int L : o.lengths) std::printf(" %14d", L);
  std::printf("\n");
  for (const auto& p : presets) {
    std::printf("%-*s", w, p.c_str());
    for (int L : o.lengths)
      for (const auto& cell : cells)
        if (cell.preset == p && cell.length == L) std::printf(" %14s", pct(cell.correct, cell.total).c_str());
    std::printf("\n");
  }
  std::printf("\nKV bits per coordinate of every position (mean over the prompts; 16 = dense f16):\n");
  for (const auto& p : presets) {
    std::printf("%-*s", w, p.c_str());
    for (int L : o.lengths)
      for (const auto& cell : cells)
        if (cell.preset == p && cell.length == L) std::printf(" %14.2f", cell.kv_bits_per_coord);
    std::printf("\n");
  }
  std::printf("\nby depth (%%):\n%-*s %6s", w, "preset", "length");
  for (double d : o.depths) std::printf(" %10.0f", d);
  std::printf("\n");
  for (const auto& p : presets)
    for (int L : o.lengths) {
      std::printf("%-*s %6d", w, p.c_str(), L);
      for (double d : o.depths)
        for (const auto& cell : by_depth)
          if (cell.preset == p && cell.length == L && cell.depth == d)
            std::printf(" %10s", pct(cell.correct, cell.total).c_str());
      std::printf("\n");
    }
  std::printf("%zu runs in %.0f s; a trial is correct when the greedy answer (%d tokens) contains the pass key\n",
              trials.size(), secs, o.answer_tokens);
  return 0;
}

int run(const Args& a) {
  if (a.needle) return run_needle(a);
  const std::vector<std::string> presets = split_presets(a.presets);
  TQ_REQUIRE(!presets.empty(), "--kv: no preset given (e.g. --kv turbo4,paper_mse)");
  for (const auto& p : presets) find_kv_preset(p);  // unknown names fail before the model loads
  find_kv_preset(a.reference);

  auto model = Model::load(resolve_model(a.model), a.allow_unsupported);
  const ModelConfig& c = model->config();
  const Tokenizer tok = Tokenizer::from_gguf(model->file());
  EvalText text = load_eval_text(a.text);
  const std::vector<int32_t> ids = eval_tokens(tok, text, a.max_tokens);

  EvalOptions o;
  o.ctx = a.ctx;
  o.stride = a.stride;
  o.k_start = a.k_start;
  o.chunk = a.chunk;
  o.threads = a.threads > 0 ? a.threads : hardware_threads();
  o.bos = tok.add_bos_default() ? tok.bos_id() : -1;
  o.reference = a.reference;
  o.dense_window = a.dense_window;
  o.dense_prefix = a.dense_prefix;
  o.dense_layers = parse_layer_list("--dense-layers", a.dense_layers, c.n_layers, &c.layer_local);
  o.swa_full = a.swa_full;
  o.progress = progress_bar("positions");
  const bool bar = bool(o.progress);
  if (!a.json)
    std::fprintf(stderr, "tq eval: %s, %zu tokens of %s; ctx %d, stride %d, k_start %d, dense window %d, "
                 "dense prefix %d, reference %s, %d threads\n", c.name.c_str(), ids.size(), text.source.c_str(),
                 a.ctx, a.stride, a.k_start, a.dense_window, a.dense_prefix, a.reference.c_str(), o.threads);
  if (a.per_layer)
    TQ_REQUIRE(presets.size() == 1, "--per-layer takes one preset in --kv, got ", presets.size());
  const std::vector<EvalResult> rs = a.per_layer ? evaluate_per_layer(*model, ids, presets[0], o)
                                                 : evaluate(*model, ids, presets, o);
  if (bar) std::fprintf(stderr, "\n");

  if (a.json) {
    nlohmann::ordered_json out = nlohmann::ordered_json::array();  // keys in the documented order
    for (const auto& r : rs)
      out.push_back({{"preset", r.preset}, {"ppl", r.ppl}, {"ppl_dense", r.ppl_dense},
                     {"ppl_delta_pct", r.ppl_delta_pct}, {"kl_mean", r.kl_mean}, {"kl_max", r.kl_max},
                     {"top1_agree", r.top1_agree}, {"kv_bytes", r.kv_bytes}, {"kv_bytes_dense", r.kv_bytes_dense},
                     {"tokens", r.tokens}, {"dense_window", a.dense_window}, {"dense_prefix", a.dense_prefix}});
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  const int w = preset_column_width(rs, [](const auto& r) -> const std::string& { return r.preset; });
  std::printf("%-*s %9s %9s %8s %10s %9s %7s %11s %7s\n", w, "preset", "ppl", "ppl_dense", "dppl%", "KL mean",
              "KL max", "top1", "KV bytes", "ratio");
  for (const auto& r : rs)
    std::printf("%-*s %9.4f %9.4f %+8.3f %10.6f %9.4f %7.4f %11zu %6.2fx\n", w, r.preset.c_str(), r.ppl, r.ppl_dense,
                r.ppl_delta_pct, r.kl_mean, r.kl_max, r.top1_agree, r.kv_bytes,
                double(r.kv_bytes_dense) / double(std::max<size_t>(r.kv_bytes, 1)));
  std::printf("%zu scored tokens; dense reference %s, %zu KV bytes per window; every preset keeps the newest %d "
              "and the first %d tokens dense\n", rs.front().tokens, a.reference.c_str(), rs.front().kv_bytes_dense,
              a.dense_window, a.dense_prefix);
  return 0;
}

}  // namespace

std::vector<int32_t> eval_tokens(const Tokenizer& tok, EvalText& text, int max_tokens) {
  // The BPE tokenizer need not see a whole book to give max_tokens tokens:
  // 16 bytes a token is far more than English or C++ needs. Cut at a space so
  // that no word is split; the token count is cut exactly below.
  const size_t keep = size_t(max_tokens) * 16;
  if (max_tokens > 0 && text.text.size() > keep) {
    const size_t cut = text.text.find_last_of(" \n", keep);
    text.text.resize(cut == std::string::npos ? keep : cut);
  }
  std::vector<int32_t> ids = tok.encode(text.text, /*add_bos=*/false);
  if (max_tokens > 0 && ids.size() > size_t(max_tokens)) ids.resize(size_t(max_tokens));
  return ids;
}

EvalText load_eval_text(const std::string& arg) {
  if (arg == "prose" || arg == "code") return default_eval_text(arg);
  std::ifstream in(arg, std::ios::binary);
  TQ_REQUIRE(in, "--text: cannot read '", arg, "' (a text file, or 'prose' / 'code' for the defaults)");
  EvalText t;
  t.text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  t.source = arg;
  return t;
}

Runner add_eval(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand(
      "eval", "Perplexity, KL(dense || preset) and top-1 agreement of KV presets on a text (teacher-forced)");
  sub->add_option("-m,--model", a->model, "Model name (tq models list) or GGUF path")->capture_default_str();
  sub->add_option("--text", a->text,
                  "Text file, or 'prose' (the book in Debian package cfi-en) or 'code' (nlohmann-json3-dev headers)")
      ->capture_default_str();
  sub->add_option("--kv", a->presets, "Comma list of KV presets (tq kv-presets) or k=SPEC/v=SPEC, each optionally with a layer policy "
                  "+LAYERS=PRESET (LAYERS: comma list of indices, negative from the end, or 'global' / 'local' for "
                  "full-attention / sliding-window layers), e.g. turbo3+global=turbo4-out")
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
  sub->add_option("--dense-window", a->dense_window, "Keep the newest W tokens dense in every preset (0 = none)")
      ->check(CLI::Range(0, 1 << 30))->capture_default_str();
  sub->add_option("--dense-prefix", a->dense_prefix,
                  "Keep the first S tokens (the attention sinks) dense in every preset (0 = none)")
      ->check(CLI::Range(0, 1 << 30))->capture_default_str();
  sub->add_option("--dense-layers", a->dense_layers,
                  "Comma list of layers kept dense (negative: from the end; 'local' / 'global': the model's "
                  "sliding-window / full-attention layers)");
  sub->add_flag("--swa-full", a->swa_full,
                "Sliding-window layers keep every token (default: they free what their window no longer sees; "
                "the same attention up to the order of float additions, fewer kv_bytes)");
  sub->add_flag("--json", a->json, "Print a JSON array, one object per preset (with --needle: one object)");
  sub->add_flag("--per-layer", a->per_layer,
                "Where the loss comes from: one row per layer L (\"PRESET@layerL\") with only that layer "
                "compressed and every other layer dense (one preset in --kv)");
  auto* g = sub->add_option_group("needle", "Needle in a haystack (pass-key retrieval) instead of perplexity");
  g->add_flag("--needle", a->needle,
              "Hide a random 5-7 digit pass key at each depth of a filler text of each length, ask for it "
              "(plain prompt, or --needle-chat), decode greedily and report retrieval accuracy per preset "
              "and length; the dense --ref runs first on the same prompts");
  g->add_option("--needle-lengths", a->needle_lengths,
                "Comma list of lengths in positions, prompt + answer (default: 1024, 2048, ... up to the model's "
                "context, at most 8192)");
  g->add_option("--needle-depths", a->needle_depths, "Comma list of needle depths in % of the filler")
      ->capture_default_str();
  g->add_option("--needle-trials", a->needle_trials, "Prompts per (length, depth), each with its own key")
      ->check(CLI::Range(1, 10000))->capture_default_str();
  g->add_option("--needle-filler", a->needle_filler,
                "Filler: 'prose' (real sentences of the default prose text, the book in Debian package cfi-en, "
                "from a random sentence) or 'repeat' (the classic \"The grass is green. The sky is blue. ...\")")
      ->capture_default_str();
  g->add_option("--needle-answer", a->needle_answer, "Greedy tokens decoded for the answer")
      ->check(CLI::Range(1, 256))->capture_default_str();
  g->add_flag("--needle-chat", a->needle_chat,
              "Wrap the prompt in the model's chat template (as tq generate --chat), the answer started with "
              "\"The pass key is\"; default: the plain prompt \"<instruction> <haystack> What is the pass key? "
              "The pass key is\", which SmolLM2-135M-Instruct answers far more often (3/5 against 1/5 dense at 1024)");
  g->add_option("--seed", a->seed, "Seed of the pass keys and filler offsets")->capture_default_str();
  sub->add_flag("--allow-unsupported", a->allow_unsupported, "Run an unsupported architecture as llama (experimental)");
  return [a] { return run(*a); };
}

}  // namespace tq::cli
