// Quality of KV presets on a real model (perplexity, KL, top-1 agreement),
// and the default evaluation texts.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>

#include "turboquant/error.hpp"
#include "turboquant/eval.hpp"
#include "turboquant/format.hpp"
#include "turboquant/kv_cache.hpp"
#include "turboquant/model.hpp"

namespace tq {

// ---- Metrics -----------------------------------------------------------------

double log_sum_exp(const float* x, int n) {
  TQ_ASSERT(n >= 1);
  double m = x[0];
  for (int i = 1; i < n; ++i) m = std::max(m, double(x[i]));
  double s = 0;
  for (int i = 0; i < n; ++i) s += std::exp(double(x[i]) - m);
  return m + std::log(s);
}

double token_nll(const float* x, int n, int target) {
  TQ_ASSERT(target >= 0 && target < n);
  return log_sum_exp(x, n) - double(x[target]);
}

double kl_divergence(const float* x, const float* y, int n) {
  // KL = sum_i p_i (log p_i - log q_i), log p_i = x_i - lse(x). The term
  // (x_i - y_i) - (lse_x - lse_y) is formed from the differences so that
  // identical inputs give exactly 0.
  const double lx = log_sum_exp(x, n), ly = log_sum_exp(y, n);
  const double dl = lx - ly;
  double kl = 0;
  for (int i = 0; i < n; ++i) {
    const double p = std::exp(double(x[i]) - lx);
    kl += p * ((double(x[i]) - double(y[i])) - dl);
  }
  // KL >= 0; a rounding residue of ~1e-16 below zero would only confuse a max.
  return std::max(kl, 0.0);
}

int argmax(const float* x, int n) { return int(std::max_element(x, x + n) - x); }

void EvalStats::add(const float* ref, const float* x, int vocab, int target) {
  ++tokens;
  nll_ref += token_nll(ref, vocab, target);
  nll += token_nll(x, vocab, target);
  const double kl = kl_divergence(ref, x, vocab);
  kl_sum += kl;
  kl_max = std::max(kl_max, kl);
  agree += argmax(ref, vocab) == argmax(x, vocab);
}
double EvalStats::ppl_ref() const { return tokens ? std::exp(nll_ref / double(tokens)) : 0.0; }
double EvalStats::ppl() const { return tokens ? std::exp(nll / double(tokens)) : 0.0; }
double EvalStats::kl_mean() const { return tokens ? kl_sum / double(tokens) : 0.0; }
double EvalStats::top1_agree() const { return tokens ? double(agree) / double(tokens) : 0.0; }

// ---- Evaluation ----------------------------------------------------------------

namespace {

struct Window {
  size_t begin = 0, end = 0;  // text tokens [begin, end)
  size_t first_scored = 0;    // first text index scored in this window
};

// The windows over n_text tokens with `span` text tokens each.
std::vector<Window> plan_windows(size_t n_text, size_t span, size_t stride) {
  std::vector<Window> w;
  size_t scored_end = 0;  // text tokens [0, scored_end) are done (token 0 is never scored)
  for (size_t b = 0; b < n_text; b += stride) {
    const size_t e = std::min(b + span, n_text);
    const size_t first = std::max(b + 1, scored_end);
    if (first < e) w.push_back({b, e, first});
    scored_end = std::max(scored_end, e);
    if (e == n_text) break;
  }
  return w;
}

KvCacheConfig preset_config(const Model& model, const std::string& preset, const EvalOptions& o) {
  KvCacheConfig cc = model.cache_config(preset, o.swa_full);
  cc.dense_window = o.dense_window;
  cc.dense_prefix = o.dense_prefix;
  cc.dense_layers = o.dense_layers;
  // The cache upgrades a layer inside the append that reaches k_start, so the
  // same forward call would already attend compressed keys. We want the
  // first k_start positions attended densely, so the cache never upgrades by
  // itself (layers start dense) and evaluate() calls upgrade() after them.
  if (o.k_start > 0) cc.k_start = std::numeric_limits<int>::max();
  cc.validate();
  return cc;
}

}  // namespace

namespace {

// evaluate() over explicit cache configs (one per result), named `names`.
std::vector<EvalResult> evaluate_configs(const Model& model, const std::vector<int32_t>& tokens,
                                         const std::vector<std::string>& presets,
                                         const std::vector<KvCacheConfig>& configs,
                                         const EvalOptions& o);

}  // namespace

std::vector<EvalResult> evaluate(const Model& model, const std::vector<int32_t>& tokens,
                                 const std::vector<std::string>& presets, const EvalOptions& o) {
  TQ_REQUIRE(!presets.empty(), "eval: no KV preset to evaluate");
  std::vector<KvCacheConfig> configs;
  for (const auto& p : presets) configs.push_back(preset_config(model, p, o));
  return evaluate_configs(model, tokens, presets, configs, o);
}

std::vector<EvalResult> evaluate_per_layer(const Model& model, const std::vector<int32_t>& tokens,
                                           const std::string& preset, const EvalOptions& o) {
  const int L = model.config().n_layers;
  std::vector<std::string> names;
  std::vector<KvCacheConfig> configs;
  for (int l = 0; l < L; ++l) {
    KvCacheConfig cc = preset_config(model, preset, o);
    cc.dense_layers.clear();
    for (int j = 0; j < L; ++j)
      if (j != l) cc.dense_layers.push_back(j);
    cc.validate();
    configs.push_back(std::move(cc));
    names.push_back(preset + "@layer" + std::to_string(l));
  }
  return evaluate_configs(model, tokens, names, configs, o);
}

namespace {

std::vector<EvalResult> evaluate_configs(const Model& model, const std::vector<int32_t>& tokens,
                                         const std::vector<std::string>& presets,
                                         const std::vector<KvCacheConfig>& configs,
                                         const EvalOptions& o) {
  const ModelConfig& mc = model.config();
  const int V = mc.vocab;
  const int off = o.bos >= 0 ? 1 : 0;
  TQ_REQUIRE(o.ctx >= 2 + off, "eval: ctx must be >= ", 2 + off, ", got ", o.ctx);
  TQ_REQUIRE(mc.context_length <= 0 || o.ctx <= mc.context_length, "eval: ctx ", o.ctx,
             " exceeds the model's context length ", mc.context_length);
  const int span = o.ctx - off;
  const int stride = o.stride == 0 ? span : o.stride;
  TQ_REQUIRE(stride >= 1 && stride <= span, "eval: stride must be 1..", span,
             " (the text tokens of one window), got ", o.stride);
  TQ_REQUIRE(o.k_start >= 0 && o.k_start < o.ctx, "eval: k_start must be 0..", o.ctx - 1,
             " (less than ctx), got ", o.k_start);
  TQ_REQUIRE(o.chunk >= 1, "eval: chunk must be >= 1, got ", o.chunk);
  TQ_REQUIRE(o.bos < V, "eval: BOS id ", o.bos, " is outside the vocabulary 0..", V - 1);
  TQ_REQUIRE(!presets.empty(), "eval: no KV preset to evaluate");
  TQ_REQUIRE(is_dense(parse_format(find_kv_preset(o.reference).k_spec).method),
             "eval: the reference '", o.reference, "' is not a dense preset (dense-f16, dense-bf16, dense-f32)");
  for (int32_t t : tokens)
    TQ_REQUIRE(t >= 0 && t < V, "eval: token id ", t, " is outside the vocabulary 0..", V - 1);
  const std::vector<Window> windows = plan_windows(tokens.size(), size_t(span), size_t(stride));
  TQ_REQUIRE(!windows.empty(), "eval: the text has ", tokens.size(),
             " tokens; at least 2 are needed to score one");

  const size_t P = presets.size();
  TQ_ASSERT(configs.size() == P);
  EvalOptions ref_options;  // the reference is plain dense: no window, prefix or layer policy
  ref_options.swa_full = o.swa_full;
  const KvCacheConfig ref_config = preset_config(model, o.reference, ref_options);

  std::vector<EvalStats> stats(P);
  std::vector<size_t> kv_bytes(P, 0);
  size_t kv_bytes_ref = 0;
  size_t done = 0, total = 0;
  for (const Window& w : windows) total += size_t(off) + (w.end - w.begin);

  std::vector<int32_t> ids;
  std::vector<float> ref_logits(size_t(o.chunk) * V);
  std::vector<std::vector<float>> logits(P, std::vector<float>(size_t(o.chunk) * V));
  for (const Window& w : windows) {
    ids.clear();
    if (off) ids.push_back(o.bos);
    ids.insert(ids.end(), tokens.begin() + w.begin, tokens.begin() + w.end);
    const int n = int(ids.size());
    // Position p predicts ids[p + 1]; the scored targets are ids[first_pred + 1 ..].
    const int first_pred = int(w.first_scored - w.begin) + off - 1;
    KvCache ref_cache(ref_config);
    const int ref_seq = ref_cache.add_sequence();
    std::vector<std::unique_ptr<KvCache>> caches;
    std::vector<int> seqs;
    for (const auto& cc : configs) {
      caches.push_back(std::make_unique<KvCache>(cc));
      seqs.push_back(caches.back()->add_sequence());
    }
    bool upgraded = o.k_start == 0;
    for (int p0 = 0; p0 < n;) {
      // Chunks end at k_start (the upgrade). They do not end at first_pred:
      // a first chunk of just the BOS would be all a calibrated format (hi=,
      // per-head outlier channels) ever sees of the text.
      int p1 = std::min(n, p0 + o.chunk);
      if (!upgraded && p0 < o.k_start) p1 = std::min(p1, o.k_start);
      const bool want = p1 > first_pred;  // some position of this chunk predicts a scored target
      const int m = p1 - p0;
      model.forward(ref_cache, ref_seq, ids.data() + p0, m, p0, ref_logits.data(), o.threads, want);
      for (size_t i = 0; i < P; ++i)
        model.forward(*caches[i], seqs[i], ids.data() + p0, m, p0, logits[i].data(), o.threads, want);
      if (!upgraded && p1 >= o.k_start) {
        for (auto& c : caches) c->upgrade(o.k_start);
        upgraded = true;
      }
      if (want)
        for (int p = std::max(p0, first_pred); p < p1 && p + 1 < n; ++p) {
          const size_t row = size_t(p - p0) * V;
          for (size_t i = 0; i < P; ++i) stats[i].add(&ref_logits[row], &logits[i][row], V, ids[p + 1]);
        }
      done += size_t(m);
      if (o.progress) o.progress(done, total);
      p0 = p1;
    }
    // KV bytes of the first window, the largest one (only the last may be
    // shorter, and with k_start it may end before the upgrade).
    if (&w == &windows.front()) {
      kv_bytes_ref = ref_cache.memory().used.total();
      for (size_t i = 0; i < P; ++i) kv_bytes[i] = caches[i]->memory().used.total();
    }
  }

  std::vector<EvalResult> out;
  for (size_t i = 0; i < P; ++i) {
    EvalResult r;
    r.preset = presets[i];
    r.ppl = stats[i].ppl();
    r.ppl_dense = stats[i].ppl_ref();
    r.ppl_delta_pct = 100.0 * (r.ppl / r.ppl_dense - 1.0);
    r.kl_mean = stats[i].kl_mean();
    r.kl_max = stats[i].kl_max;
    r.top1_agree = stats[i].top1_agree();
    r.kv_bytes = kv_bytes[i];
    r.kv_bytes_dense = kv_bytes_ref;
    r.tokens = stats[i].tokens;
    out.push_back(r);
  }
  return out;
}

}  // namespace

// ---- Default texts ----------------------------------------------------------------

namespace {

void put_utf8(std::string& out, uint32_t c) {
  if (c < 0x80) {
    out += char(c);
  } else if (c < 0x800) {
    out += char(0xC0 | (c >> 6));
    out += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += char(0xE0 | (c >> 12));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  } else {
    out += char(0xF0 | (c >> 18));
    out += char(0x80 | ((c >> 12) & 0x3F));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  }
}

// Windows-1252 code points 0x80..0x9F (0: undefined there).
constexpr uint16_t kCp1252[32] = {
    0x20AC, 0, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
    0x2039, 0x0152, 0, 0x017D, 0, 0, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
    0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0, 0x017E, 0x0178};

std::string lower(std::string_view s) {
  std::string r(s);
  for (char& c : r) c = char(std::tolower(static_cast<unsigned char>(c)));
  return r;
}

std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  TQ_REQUIRE(in, "cannot read '", p.string(), "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

std::string html_to_text(std::string_view h) {
  std::string out;
  bool space = false;  // a whitespace run is pending
  auto brk = [&](int newlines) {
    while (!out.empty() && out.back() == ' ') out.pop_back();
    int have = 0;
    for (size_t i = out.size(); i > 0 && out[i - 1] == '\n'; --i) ++have;
    if (!out.empty())
      for (int i = have; i < newlines; ++i) out += '\n';
    space = false;
  };
  auto text = [&](std::string_view s) {
    if (space && !out.empty() && out.back() != '\n') out += ' ';
    space = false;
    out += s;
  };
  size_t i = 0;
  while (i < h.size()) {
    const char c = h[i];
    if (c == '<') {
      if (h.compare(i, 4, "<!--") == 0) {
        const size_t e = h.find("-->", i + 4);
        i = e == std::string_view::npos ? h.size() : e + 3;
        continue;
      }
      const size_t e = h.find('>', i);
      if (e == std::string_view::npos) break;
      size_t a = i + 1;
      const bool closing = a < e && h[a] == '/';
      if (closing) ++a;
      size_t b = a;
      while (b < e && std::isalnum(static_cast<unsigned char>(h[b]))) ++b;
      const std::string tag = lower(h.substr(a, b - a));
      i = e + 1;
      if (!closing && (tag == "head" || tag == "script" || tag == "style")) {
        const size_t end = lower(h.substr(i)).find("</" + tag);
        i = end == std::string::npos ? h.size() : i + end;
        continue;
      }
      if (tag == "br") brk(1);
      else if (tag == "p" || tag == "div" || tag == "tr" || tag == "li" || tag == "table" ||
               tag == "title" || (tag.size() == 2 && tag[0] == 'h' && tag[1] >= '1' && tag[1] <= '6'))
        brk(2);
      continue;
    }
    if (c == '&') {
      const size_t e = h.find(';', i);
      if (e != std::string_view::npos && e - i <= 10) {
        const std::string name = lower(h.substr(i + 1, e - i - 1));
        uint32_t cp = 0;
        if (name == "amp") cp = '&';
        else if (name == "lt") cp = '<';
        else if (name == "gt") cp = '>';
        else if (name == "quot") cp = '"';
        else if (name == "apos") cp = '\'';
        else if (name == "nbsp") cp = ' ';
        else if (name.size() > 1 && name[0] == '#') {
          const bool hex = name[1] == 'x';
          char* endp = nullptr;
          const unsigned long v = std::strtoul(name.c_str() + (hex ? 2 : 1), &endp, hex ? 16 : 10);
          if (endp && *endp == 0 && v > 0 && v <= 0x10FFFF) cp = uint32_t(v);
          if (cp >= 0x80 && cp <= 0x9F) cp = kCp1252[cp - 0x80] ? kCp1252[cp - 0x80] : 0xFFFD;
        }
        if (cp != 0) {
          if (cp == ' ') {
            space = true;
          } else {
            std::string s;
            put_utf8(s, cp);
            text(s);
          }
          i = e + 1;
          continue;
        }
      }
    }
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t' || c == '\f') {
      space = true;
      ++i;
      continue;
    }
    text(h.substr(i, 1));
    ++i;
  }
  brk(1);
  while (out.size() >= 2 && out[out.size() - 2] == '\n') out.pop_back();  // one final newline
  return out;
}

EvalText default_eval_text(std::string_view kind) {
  namespace fs = std::filesystem;
  EvalText t;
  if (kind == "prose") {
    const fs::path dir = "/usr/share/doc/cfi-en/html";
    std::vector<std::string> files = {"preface.htm"};
    for (int c = 1; c <= 17; ++c) files.push_back("ch" + std::to_string(c) + "web.htm");
    for (const auto& f : files)
      TQ_REQUIRE(fs::exists(dir / f), "the default prose text needs '", (dir / f).string(),
                 "' (the book \"Copyright Does Not Exist\"): install the Debian package cfi-en "
                 "(apt-get install cfi-en), or pass --text FILE");
    for (const auto& f : files) t.text += html_to_text(read_file(dir / f)) + "\n";
    t.source = "\"Copyright Does Not Exist\" (Linus Walleij, public domain), Debian package cfi-en, " +
               dir.string() + "/{preface,ch1web..ch17web}.htm as text";
    return t;
  }
  if (kind == "code") {
    const fs::path dir = "/usr/include/nlohmann";
    TQ_REQUIRE(fs::exists(dir / "json.hpp"), "the default code text needs '", (dir / "json.hpp").string(),
               "': install the Debian package nlohmann-json3-dev, or pass --text FILE");
    std::vector<fs::path> files;
    for (const auto& e : fs::recursive_directory_iterator(dir))
      if (e.is_regular_file() && e.path().extension() == ".hpp") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files)
      t.text += "// ---- " + fs::relative(f, dir.parent_path()).string() + "\n" + read_file(f) + "\n";
    t.source = "nlohmann/json C++ headers, Debian package nlohmann-json3-dev, " + dir.string() +
               "/**/*.hpp (" + std::to_string(files.size()) + " files, sorted)";
    return t;
  }
  TQ_THROW("unknown default text '", kind, "' (valid: prose, code, or a file path)");
}

}  // namespace tq
