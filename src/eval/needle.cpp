// Needle in a haystack (pass-key retrieval) on a real model, and the bit
// budget of a preset for tq sweep.
#include "turboquant/needle.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "turboquant/error.hpp"
#include "turboquant/eval.hpp"
#include "turboquant/format.hpp"
#include "turboquant/kv_cache.hpp"
#include "turboquant/model.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq {
namespace {

bool is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\f' || c == '\v'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }
// Closing marks that stay with the sentence they end: ."  .)  .'
bool is_closer(char c) { return c == '"' || c == '\'' || c == ')' || c == ']'; }

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

constexpr const char* kInstruction =
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will ask you about the important information there.";
constexpr const char* kQuestion = "What is the pass key?";
constexpr const char* kAnswerStart = "The pass key is";

}  // namespace

// ---- Prompt construction -------------------------------------------------------------

std::vector<std::string> needle_split_sentences(std::string_view t) {
  std::vector<std::string> out;
  const size_t n = t.size();
  size_t i = 0;
  while (i < n) {
    size_t j = i;
    while (j < n && is_space(t[j])) ++j;  // the whitespace before the sentence
    size_t k = j;
    while (k < n && t[k] != '\n') {
      const char c = t[k];
      if (c == '.' || c == '!' || c == '?') {
        size_t e = k + 1;
        while (e < n && (is_closer(t[e]) || t[e] == '.' || t[e] == '!' || t[e] == '?')) ++e;
        k = e;
        if (e == n || is_space(t[e])) break;  // "end. Next" ends a sentence, "3.14" does not
        continue;
      }
      ++k;
    }
    if (k == j) {  // only whitespace left: it belongs to the last sentence
      if (!out.empty()) out.back() += std::string(t.substr(i, k - i));
    } else {
      out.emplace_back(t.substr(i, k - i));
    }
    i = k;
  }
  return out;
}

NeedleFiller needle_make_filler(std::string_view text, const NeedleEncoder& encode) {
  NeedleFiller f;
  for (const std::string& s : needle_split_sentences(text)) {
    std::vector<int32_t> ids = encode(s);
    if (!ids.empty()) f.sentences.push_back(std::move(ids));
  }
  TQ_REQUIRE(!f.sentences.empty(), "needle: the filler text (", text.size(), " bytes) has no sentence");
  return f;
}

NeedleFrame needle_frame(const Tokenizer& tok, bool chat) {
  NeedleFrame f;
  if (chat && tok.chat_format() != Tokenizer::ChatFormat::none) {
    // The template around a marker in the user turn: what comes before the
    // marker is the head, what follows (question, end of turn, the assistant's
    // turn) the tail, and the answer is started for the model.
    const std::string marker = "\x01\x02HAYSTACK\x02\x01";
    const std::string p = tok.apply_chat_template(
        {{"user", std::string(kInstruction) + "\n\n" + marker + "\n\n" + kQuestion}}, true);
    const size_t at = p.find(marker);
    TQ_ASSERT(at != std::string::npos);
    // As encode_chat: Gemma's template writes "<bos>" itself, ChatML carries none.
    const bool bos = tok.chat_format() == Tokenizer::ChatFormat::chatml && tok.add_bos_default() &&
                     tok.bos_id() >= 0;
    f.head = tok.encode(p.substr(0, at), bos, /*parse_special=*/true);
    f.tail = tok.encode(p.substr(at + marker.size()) + kAnswerStart, false, /*parse_special=*/true);
  } else {
    f.head = tok.encode(std::string(kInstruction) + "\n\n", tok.add_bos_default() && tok.bos_id() >= 0);
    f.tail = tok.encode(std::string("\n\n") + kQuestion + " " + kAnswerStart, false);
  }
  return f;
}

std::string needle_sentence(std::string_view passkey) {
  const std::string k(passkey);
  return " The pass key is " + k + ". Remember it. " + k + " is the pass key.";
}

std::string needle_passkey(uint64_t seed) {
  const uint64_t r = splitmix64(seed ^ 0x7061737373ull);
  const int digits = 5 + int(r % 3);
  uint64_t lo = 1;
  for (int i = 1; i < digits; ++i) lo *= 10;
  return std::to_string(lo + (r >> 8) % (9 * lo));
}

NeedlePrompt needle_build_prompt(const NeedleFiller& filler, const NeedleFrame& frame,
                                 const std::vector<int32_t>& needle, std::string_view passkey,
                                 int prompt_tokens, double depth_pct, size_t first_sentence) {
  TQ_REQUIRE(!filler.sentences.empty(), "needle: empty filler");
  TQ_REQUIRE(!needle.empty(), "needle: empty needle sentence");
  TQ_REQUIRE(depth_pct >= 0 && depth_pct <= 100, "needle: depth must be 0..100 %, got ", depth_pct);
  const long fixed = long(frame.head.size() + frame.tail.size() + needle.size());
  const long n_fill = long(prompt_tokens) - fixed;
  TQ_REQUIRE(n_fill >= 1, "needle: a prompt of ", prompt_tokens, " tokens leaves no room for filler (the frame and "
             "the needle take ", fixed, "); use a longer length");

  // The filler tokens and the sentence starts in them (0 and n_fill included).
  std::vector<int32_t> fill;
  fill.reserve(size_t(n_fill));
  std::vector<long> starts;
  const size_t S = filler.sentences.size();
  for (size_t s = first_sentence % S; long(fill.size()) < n_fill; s = (s + 1) % S) {
    starts.push_back(long(fill.size()));
    const auto& sent = filler.sentences[s];
    const size_t take = std::min(sent.size(), size_t(n_fill) - fill.size());  // the last one is cut
    fill.insert(fill.end(), sent.begin(), sent.begin() + long(take));
  }
  starts.push_back(n_fill);
  const double target = depth_pct / 100.0 * double(n_fill);
  long at = starts.front();
  for (long b : starts)
    if (std::fabs(double(b) - target) < std::fabs(double(at) - target)) at = b;

  NeedlePrompt p;
  p.passkey = std::string(passkey);
  p.ids = frame.head;
  p.filler_begin = int(p.ids.size());
  p.ids.insert(p.ids.end(), fill.begin(), fill.begin() + at);
  p.needle_begin = int(p.ids.size());
  p.ids.insert(p.ids.end(), needle.begin(), needle.end());
  p.needle_end = int(p.ids.size());
  p.ids.insert(p.ids.end(), fill.begin() + at, fill.end());
  p.filler_end = int(p.ids.size());
  p.ids.insert(p.ids.end(), frame.tail.begin(), frame.tail.end());
  p.depth = 100.0 * double(at) / double(n_fill);
  TQ_ASSERT(long(p.ids.size()) == prompt_tokens);
  return p;
}

bool needle_found(std::string_view answer, std::string_view passkey) {
  size_t i = 0;
  while (i < answer.size()) {
    if (!is_digit(answer[i])) {
      ++i;
      continue;
    }
    size_t e = i;
    while (e < answer.size() && is_digit(answer[e])) ++e;
    if (answer.substr(i, e - i) == passkey) return true;
    i = e;
  }
  return false;
}

// ---- Running it -----------------------------------------------------------------------

uint64_t needle_trial_seed(uint64_t seed, int length, size_t depth_index, int trial) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ uint64_t(uint32_t(length)));
  h = splitmix64(h ^ uint64_t(depth_index));
  return splitmix64(h ^ uint64_t(uint32_t(trial)));
}

namespace {

KvCacheConfig needle_cache_config(const Model& model, const std::string& preset, const NeedleOptions& o) {
  KvCacheConfig cc = model.cache_config(preset, o.swa_full);
  cc.dense_window = o.dense_window;
  cc.dense_prefix = o.dense_prefix;
  cc.dense_layers = o.dense_layers;
  // As in evaluate(): the cache would upgrade inside the append that reaches
  // k_start, so that call would already attend compressed keys; the layers
  // stay dense until k_start positions are done and upgrade() is called then.
  if (o.k_start > 0) cc.k_start = std::numeric_limits<int>::max();
  cc.validate();
  return cc;
}

// Prefill `ids`, then greedy decode up to o.answer_tokens tokens (stopping at
// end of generation). Returns the generated ids.
std::vector<int32_t> needle_answer(const Model& model, const Tokenizer& tok, const KvCacheConfig& cc,
                                   const std::vector<int32_t>& ids, const NeedleOptions& o,
                                   const std::function<void(size_t)>& advanced, size_t* kv_bytes,
                                   int* positions) {
  const int V = model.config().vocab;
  KvCache cache(cc);
  const int seq = cache.add_sequence();
  std::vector<float> logits(static_cast<size_t>(V));
  bool upgraded = o.k_start == 0;
  auto after = [&](int pos_end, int m) {
    if (!upgraded && pos_end >= o.k_start) {
      cache.upgrade(o.k_start);
      upgraded = true;
    }
    advanced(size_t(m));
  };
  const int n = int(ids.size());
  for (int p0 = 0; p0 < n;) {
    int p1 = std::min(n, p0 + o.chunk);
    if (!upgraded && p0 < o.k_start) p1 = std::min(p1, o.k_start);
    model.forward(cache, seq, ids.data() + p0, p1 - p0, p0, logits.data(), o.threads);
    after(p1, p1 - p0);
    p0 = p1;
  }
  std::vector<int32_t> out;
  for (int i = 0, pos = n; i < o.answer_tokens; ++i, ++pos) {
    const int32_t next = argmax(logits.data(), V);
    if (tok.is_eog(next)) break;
    out.push_back(next);
    if (i + 1 == o.answer_tokens) break;  // the last token needs no forward pass
    model.forward(cache, seq, &next, 1, pos, logits.data(), o.threads);
    after(pos + 1, 1);
  }
  *kv_bytes = cache.memory().used.total();
  *positions = cache.n_tokens(seq, 0);
  return out;
}

}  // namespace

std::vector<NeedleTrial> needle_run(const Model& model, const Tokenizer& tok, std::string_view filler_text,
                                    const std::vector<std::string>& presets, const NeedleOptions& o) {
  const ModelConfig& mc = model.config();
  TQ_REQUIRE(!presets.empty(), "needle: no KV preset to run");
  TQ_REQUIRE(!o.lengths.empty(), "needle: no length given");
  TQ_REQUIRE(!o.depths.empty(), "needle: no depth given");
  TQ_REQUIRE(o.trials >= 1, "needle: trials must be >= 1, got ", o.trials);
  TQ_REQUIRE(o.answer_tokens >= 1 && o.answer_tokens <= 256, "needle: answer_tokens must be 1..256, got ",
             o.answer_tokens);
  TQ_REQUIRE(o.chunk >= 1, "needle: chunk must be >= 1, got ", o.chunk);
  TQ_REQUIRE(o.k_start >= 0, "needle: k_start must be >= 0, got ", o.k_start);
  for (double d : o.depths) TQ_REQUIRE(d >= 0 && d <= 100, "needle: depth ", d, " is outside 0..100 (percent)");
  for (int L : o.lengths)
    TQ_REQUIRE(L >= 1 && (mc.context_length <= 0 || L <= mc.context_length), "needle: length ", L,
               " is outside 1..", mc.context_length, " (the model's context length)");
  std::vector<KvCacheConfig> configs;
  for (const auto& p : presets) configs.push_back(needle_cache_config(model, p, o));

  const NeedleEncoder encode = [&](std::string_view s) { return tok.encode(s, false); };
  const NeedleFiller filler = needle_make_filler(filler_text, encode);
  const NeedleFrame frame = needle_frame(tok, o.chat);

  size_t total = 0, done = 0;
  for (int L : o.lengths) total += size_t(L) * o.depths.size() * size_t(o.trials) * presets.size();
  auto advanced = [&](size_t m) {
    done += m;
    if (o.progress) o.progress(done, total);
  };

  std::vector<NeedleTrial> out;
  for (int L : o.lengths)
    for (size_t di = 0; di < o.depths.size(); ++di)
      for (int t = 0; t < o.trials; ++t) {
        const uint64_t s = needle_trial_seed(o.seed, L, di, t);
        const std::string key = needle_passkey(s);
        const size_t first = size_t(splitmix64(s ^ 0x66696c6cull) % filler.sentences.size());
        const NeedlePrompt p = needle_build_prompt(filler, frame, encode(needle_sentence(key)), key,
                                                   L - o.answer_tokens, o.depths[di], first);
        for (size_t i = 0; i < presets.size(); ++i) {
          const size_t before = done;
          size_t kv_bytes = 0;
          int positions = 0;
          const std::vector<int32_t> ans =
              needle_answer(model, tok, configs[i], p.ids, o, advanced, &kv_bytes, &positions);
          done = before + size_t(L);  // an answer that stopped early counts in full
          if (o.progress) o.progress(done, total);
          NeedleTrial r;
          r.preset = presets[i];
          r.length = L;
          r.depth = o.depths[di];
          r.depth_actual = p.depth;
          r.trial = t;
          r.passkey = key;
          r.answer = tok.decode(ans);
          r.correct = needle_found(r.answer, key);
          r.kv_bytes = kv_bytes;
          r.positions = positions;
          r.kv_bits_per_coord = 8.0 * double(kv_bytes) /
                                (double(positions) * mc.n_layers * mc.n_heads_kv * 2.0 * mc.head_dim);
          out.push_back(std::move(r));
        }
      }
  return out;
}

std::vector<NeedleCell> needle_summary(const std::vector<NeedleTrial>& trials, bool by_depth) {
  std::vector<NeedleCell> cells;
  for (const NeedleTrial& t : trials) {
    const double d = by_depth ? t.depth : -1.0;
    auto it = std::find_if(cells.begin(), cells.end(), [&](const NeedleCell& c) {
      return c.preset == t.preset && c.length == t.length && c.depth == d;
    });
    if (it == cells.end()) {
      cells.push_back({t.preset, t.length, d, 0, 0, 0.0});
      it = cells.end() - 1;
    }
    it->correct += t.correct;
    it->kv_bits_per_coord += t.kv_bits_per_coord;  // a sum until the end
    ++it->total;
  }
  for (NeedleCell& c : cells) c.kv_bits_per_coord /= c.total;
  return cells;
}

// ---- Bit budget ---------------------------------------------------------------------------

double kv_bits_per_coord(std::string_view preset, int head_dim) {
  const KvPreset p = find_kv_preset(preset);
  const FormatSpec k = parse_format(p.k_spec), v = parse_format(p.v_spec);
  validate_format(k, head_dim);
  validate_format(v, head_dim);
  const size_t bytes = bytes_per_vector(k, head_dim) + bytes_per_vector(v, head_dim);
  return 8.0 * double(bytes) / (2.0 * head_dim);
}

}  // namespace tq
