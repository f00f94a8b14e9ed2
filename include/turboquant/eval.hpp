// Quality of a KV preset on a real model: teacher-forced over a text, the
// dense cache and each preset see exactly the same tokens, and per scored
// token we compare the two next-token distributions: perplexity of each,
// KL(dense || preset) and top-1 agreement. This is the evidence for choosing
// a preset (issue 6; results in docs/quality.md).
//
//   auto m = tq::Model::load(tq::resolve_model("smollm2-135m"));
//   auto tok = tq::Tokenizer::from_gguf(m->file());
//   tq::EvalOptions o;
//   o.ctx = 1024;
//   o.bos = tok.add_bos_default() ? tok.bos_id() : -1;
//   auto ids = tok.encode(tq::default_eval_text("prose").text, /*add_bos=*/false);
//   for (const auto& r : tq::evaluate(*m, ids, {"turbo4", "paper_mse"}, o))
//     std::printf("%s ppl %.3f (dense %.3f) KL %.5f\n", r.preset.c_str(), r.ppl, r.ppl_dense, r.kl_mean);
//
// Windows: the text is cut into windows of ctx positions (a BOS first when
// `bos` >= 0) starting every `stride` text tokens. In a window, text token j
// is scored when j is not the window's first text token and no earlier window
// scored it, so every scored token has at least one token of context and
// windows that overlap (stride < ctx) add only new tokens.
//
// k_start > 0: the first k_start positions of each window are run with every
// layer dense, then every layer is upgraded to the preset's format (the cache's
// k_start semantics), and the rest of the window sees the compressed cache.
// k_start = 0: the compressed cache is used from the first token.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace tq {

class Model;

// ---- Metrics of one position: logits x, y: [vocab] --------------------------
// All in double and log-sum-exp stable (logits of 30+ and vocabularies of
// 262144 overflow exp in float).
double log_sum_exp(const float* x, int n);
// -log softmax(x)[target].
double token_nll(const float* x, int n, int target);
// KL(softmax(x) || softmax(y)) in nats; exactly 0 when x == y elementwise.
double kl_divergence(const float* x, const float* y, int n);
// Index of the largest logit (the first one on ties).
int argmax(const float* x, int n);

// Running sums over scored tokens for one preset against the reference.
struct EvalStats {
  size_t tokens = 0;
  double nll_ref = 0, nll = 0;  // summed -log p(true next token)
  double kl_sum = 0, kl_max = 0;
  size_t agree = 0;
  // ref, x: [vocab] logits at the position that predicts `target`.
  void add(const float* ref, const float* x, int vocab, int target);
  double ppl_ref() const;
  double ppl() const;
  double kl_mean() const;
  double top1_agree() const;
};

struct EvalOptions {
  int ctx = 1024;           // positions per window (BOS included)
  int stride = 0;           // text tokens between window starts; 0: a full window (no overlap)
  int k_start = 0;          // positions per window attended densely before the upgrade
  int chunk = 64;           // positions per forward call (bounds the logits kept: chunk x vocab)
  int threads = 1;          // for the forward pass; <= 0: all hardware threads
  int32_t bos = -1;         // >= 0: each window starts with this token
  std::string reference = "dense-f16";  // a dense preset: dense-f16, dense-bf16 or dense-f32
  int dense_window = 0;                 // applied to every preset's cache
  int dense_prefix = 0;                 // first S tokens dense (attention sinks), every preset
  std::vector<int> dense_layers;        // applied to every preset's cache
  bool swa_full = false;                // sliding-window layers keep every token (Model::cache_config)
  // Called after each chunk: positions run so far (all windows), and the total.
  std::function<void(size_t done, size_t total)> progress;
};

struct EvalResult {
  std::string preset;
  double ppl = 0, ppl_dense = 0, ppl_delta_pct = 0;
  double kl_mean = 0, kl_max = 0, top1_agree = 0;
  size_t kv_bytes = 0;        // the preset's cache, used bytes, at the end of the first (full) window
  size_t kv_bytes_dense = 0;  // the reference's, same window
  size_t tokens = 0;          // scored tokens
};

// tokens: the text's ids, without BOS. Throws tq::Error naming a bad option
// or preset, or a text too short to score one token. Memory: one cache per
// preset for one window and (1 + presets) x chunk x vocab floats of logits.
std::vector<EvalResult> evaluate(const Model& model, const std::vector<int32_t>& tokens,
                                 const std::vector<std::string>& presets, const EvalOptions& opt);

// Where a preset's loss comes from: one result per layer L, named
// "PRESET@layerL", with only layer L compressed (every other layer dense),
// against the same dense reference. KL adds up roughly over layers, so the
// per-layer KLs show which layers a layer policy should keep dense.
// Memory: one cache per layer, for one window.
std::vector<EvalResult> evaluate_per_layer(const Model& model, const std::vector<int32_t>& tokens,
                                           const std::string& preset, const EvalOptions& opt);

// ---- Default evaluation texts -----------------------------------------------
// Real text that the set-up installs from Debian packages:
//  "prose": the book "Copyright Does Not Exist" (Linus Walleij, English
//           translation, public domain), package cfi-en, HTML turned to text;
//  "code":  the nlohmann/json C++ headers, package nlohmann-json3-dev.
struct EvalText {
  std::string text;
  std::string source;  // what it is and where it was read from
};
// Throws tq::Error naming the package to install when the files are missing,
// or the valid kinds for an unknown one.
EvalText default_eval_text(std::string_view kind);
// Visible text of an HTML page: tags and comments dropped, whitespace runs
// folded, paragraph and line breaks kept as newlines, entities decoded to
// UTF-8 (&#128..159; read as Windows-1252, as browsers do).
std::string html_to_text(std::string_view html);

}  // namespace tq
