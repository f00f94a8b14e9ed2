// Needle in a haystack: sentence splitting, prompt construction (exact length,
// needle at the requested depth within one sentence) with a toy word
// tokenizer, pass-key scoring, the bit budget tq sweep reports, and (when
// SmolLM2 is pulled) a short dense run that must find the key.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <set>
#include <vector>

#include "turboquant/error.hpp"
#include "turboquant/eval.hpp"
#include "turboquant/kv_cache.hpp"
#include "turboquant/model.hpp"
#include "turboquant/model_registry.hpp"
#include "turboquant/needle.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq {
namespace {

// One token per word, its leading whitespace included (as GPT-2 BPE attaches
// a space to the word after it); ids from a hash, so equal words, equal ids.
std::vector<int32_t> toy_encode(std::string_view s) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = i;
    while (j < s.size() && std::isspace(static_cast<unsigned char>(s[j]))) ++j;
    while (j < s.size() && !std::isspace(static_cast<unsigned char>(s[j]))) ++j;
    ids.push_back(int32_t(std::hash<std::string_view>{}(s.substr(i, j - i)) & 0xFFFFF));
    i = j;
  }
  return ids;
}

// Sentences of 1 to 40 words, so "within one sentence" is a real bound.
std::string toy_text(uint32_t seed) {
  std::mt19937 rng(seed);
  std::string t;
  for (int s = 0; s < 300; ++s) {
    const int words = 1 + int(rng() % 40);
    for (int w = 0; w < words; ++w) t += (t.empty() ? "" : " ") + std::string(w == 0 ? "Word" : "w") + std::to_string(rng() % 50);
    t += (s % 7 == 6) ? ".\n" : (s % 5 == 4) ? "?\"" : ".";
  }
  return t;
}

TEST(NeedleText, SentencesConcatenateBackToTheText) {
  const std::string t = "First one. Second, with 3.14 in it!  Third?\" He said.\nNew line\n\n  Last. ";
  const auto s = needle_split_sentences(t);
  std::string joined;
  for (const auto& p : s) joined += p;
  EXPECT_EQ(joined, t);
  const std::vector<std::string> want = {"First one.", " Second, with 3.14 in it!", "  Third?\"", " He said.",
                                         "\nNew line", "\n\n  Last. "};
  EXPECT_EQ(s, want);
  EXPECT_TRUE(needle_split_sentences("").empty());
  EXPECT_TRUE(needle_split_sentences("  \n ").empty());
  const std::string big = toy_text(7);
  std::string again;
  for (const auto& p : needle_split_sentences(big)) again += p;
  EXPECT_EQ(again, big);
}

TEST(NeedleText, PasskeysAreFiveToSevenDigitsAndFollowTheSeed) {
  std::set<std::string> seen;
  std::set<size_t> lengths;
  for (uint64_t s = 0; s < 200; ++s) {
    const std::string k = needle_passkey(s);
    ASSERT_GE(k.size(), 5u) << k;
    ASSERT_LE(k.size(), 7u) << k;
    EXPECT_NE(k[0], '0') << k;
    EXPECT_TRUE(std::all_of(k.begin(), k.end(), [](char c) { return c >= '0' && c <= '9'; })) << k;
    EXPECT_EQ(k, needle_passkey(s));
    seen.insert(k);
    lengths.insert(k.size());
  }
  EXPECT_GT(seen.size(), 190u);
  EXPECT_EQ(lengths.size(), 3u);
  EXPECT_NE(needle_trial_seed(1, 1024, 0, 0), needle_trial_seed(1, 1024, 1, 0));
  EXPECT_NE(needle_trial_seed(1, 1024, 0, 0), needle_trial_seed(1, 2048, 0, 0));
  EXPECT_NE(needle_trial_seed(1, 1024, 0, 0), needle_trial_seed(1, 1024, 0, 1));
  EXPECT_NE(needle_trial_seed(1, 1024, 0, 0), needle_trial_seed(2, 1024, 0, 0));
}

TEST(NeedleScore, AcceptsTheKeyAsAWholeNumberOnly) {
  EXPECT_TRUE(needle_found(" 71432.", "71432"));
  EXPECT_TRUE(needle_found("The pass key is 71432", "71432"));
  EXPECT_TRUE(needle_found("12 and 71432, yes", "71432"));
  EXPECT_TRUE(needle_found("71432", "71432"));
  EXPECT_FALSE(needle_found(" 714320.", "71432"));  // a longer number
  EXPECT_FALSE(needle_found(" 17143 2", "71432"));
  EXPECT_FALSE(needle_found(" 7143", "71432"));
  EXPECT_FALSE(needle_found(" 71 432", "71432"));
  EXPECT_FALSE(needle_found("", "71432"));
  EXPECT_FALSE(needle_found("seventy-one thousand", "71432"));
}

TEST(NeedlePrompt, ExactLengthAndNeedleAtTheRequestedDepth) {
  const NeedleFiller filler = needle_make_filler(toy_text(3), toy_encode);
  size_t max_sentence = 0;
  for (const auto& s : filler.sentences) max_sentence = std::max(max_sentence, s.size());
  ASSERT_LE(max_sentence, 41u);
  NeedleFrame frame;
  frame.head = toy_encode("There is a key. Find it.\n\n");
  frame.tail = toy_encode("\n\nWhat is the pass key? The pass key is");
  const std::string key = "4815162";
  const std::vector<int32_t> needle = toy_encode(needle_sentence(key));
  for (int L : {60, 257, 1024, 5000})  // 5000 wraps around the filler's ~6000 words once from a late start
    for (double d : {0.0, 10.0, 25.0, 50.0, 75.0, 99.0, 100.0})
      for (size_t first : {size_t(0), size_t(137), size_t(299)}) {
        SCOPED_TRACE("length " + std::to_string(L) + ", depth " + std::to_string(d) + ", first sentence " +
                     std::to_string(first));
        const NeedlePrompt p = needle_build_prompt(filler, frame, needle, key, L, d, first);
        ASSERT_EQ(p.ids.size(), size_t(L));
        EXPECT_EQ(p.passkey, key);
        EXPECT_TRUE(std::equal(frame.head.begin(), frame.head.end(), p.ids.begin()));
        EXPECT_TRUE(std::equal(frame.tail.begin(), frame.tail.end(), p.ids.end() - long(frame.tail.size())));
        EXPECT_EQ(p.filler_begin, int(frame.head.size()));
        EXPECT_EQ(p.filler_end, L - int(frame.tail.size()));
        ASSERT_EQ(p.needle_end - p.needle_begin, int(needle.size()));
        EXPECT_TRUE(std::equal(needle.begin(), needle.end(), p.ids.begin() + p.needle_begin));
        // Depth: within one sentence of the request, in filler tokens.
        const double n_fill = double(p.filler_end - p.filler_begin) - double(needle.size());
        const double before = double(p.needle_begin - p.filler_begin);
        EXPECT_LE(std::fabs(before - d / 100.0 * n_fill), double(max_sentence)) << "needle at " << before
                                                                                 << " of " << n_fill;
        EXPECT_NEAR(p.depth, 100.0 * before / n_fill, 1e-9);
        if (d == 0) EXPECT_EQ(p.needle_begin, p.filler_begin);
        if (d == 100) EXPECT_EQ(p.needle_end, p.filler_end);
        // The needle starts at a sentence boundary: what precedes it is whole
        // sentences from `first`, except the last filler sentence, cut to fit,
        // when the needle comes after all the filler.
        size_t at = size_t(p.filler_begin);
        for (size_t s = first % filler.sentences.size(); at < size_t(p.needle_begin);
             s = (s + 1) % filler.sentences.size()) {
          const auto& sent = filler.sentences[s];
          const size_t n = std::min(sent.size(), size_t(p.needle_begin) - at);
          if (n < sent.size()) EXPECT_EQ(p.needle_end, p.filler_end) << "a sentence cut before the needle";
          ASSERT_TRUE(std::equal(sent.begin(), sent.begin() + long(n), p.ids.begin() + long(at))) << "sentence " << s;
          at += n;
        }
        EXPECT_EQ(at, size_t(p.needle_begin));
      }
  // Too short for the frame and the needle: refused, naming the length.
  try {
    needle_build_prompt(filler, frame, needle, key, int(frame.head.size() + frame.tail.size() + needle.size()), 50, 0);
    FAIL() << "a prompt without filler was built";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no room for filler"), std::string::npos) << e.what();
  }
  EXPECT_THROW(needle_build_prompt(filler, frame, needle, key, 500, 101, 0), Error);
  EXPECT_THROW(needle_make_filler(" \n ", toy_encode), Error);
}

TEST(NeedleSummary, CountsPerPresetLengthAndDepth) {
  std::vector<NeedleTrial> t;
  auto add = [&](const char* p, int L, double d, bool ok) {
    NeedleTrial x;
    x.preset = p;
    x.length = L;
    x.depth = d;
    x.correct = ok;
    t.push_back(x);
  };
  add("dense-f16", 1024, 0, true);
  add("turbo4", 1024, 0, false);
  add("dense-f16", 1024, 50, true);
  add("turbo4", 1024, 50, true);
  add("dense-f16", 2048, 0, false);
  const auto c = needle_summary(t, false);
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(c[0].preset, "dense-f16");
  EXPECT_EQ(c[0].correct, 2);
  EXPECT_EQ(c[0].total, 2);
  EXPECT_EQ(c[1].preset, "turbo4");
  EXPECT_DOUBLE_EQ(c[1].accuracy(), 0.5);
  EXPECT_EQ(c[2].length, 2048);
  EXPECT_EQ(c[2].accuracy(), 0.0);
  const auto d = needle_summary(t, true);
  ASSERT_EQ(d.size(), 5u);
  EXPECT_EQ(d[1].depth, 0.0);
  EXPECT_EQ(d[1].correct, 0);
}

// ---- tq sweep's bits per coordinate ----------------------------------------------------

TEST(SweepBits, BitsPerCoordMatchHandComputedBytes) {
  // head_dim 64. tq-mse b=4: 32 code bytes + fp16 scale = 34 per vector;
  // K + V = 68 bytes for 128 coordinates = 4.25 bits.
  EXPECT_DOUBLE_EQ(kv_bits_per_coord("turbo4", 64), 68 * 8 / 128.0);
  // b=2.5: 32 channels at 3 bits (12 + 2) + 32 at 2 bits (8 + 2) = 24 bytes: 3 bits.
  EXPECT_DOUBLE_EQ(kv_bits_per_coord("turbo2.5", 64), 3.0);
  // b=3.5: 32 at 4 bits (16 + 2) + 32 at 3 bits (12 + 2) = 32 bytes: 4 bits.
  EXPECT_DOUBLE_EQ(kv_bits_per_coord("turbo3.5", 64), 4.0);
  // b=2: 16 + 2 = 18 bytes: 2.25 bits.
  EXPECT_DOUBLE_EQ(kv_bits_per_coord("k=tq-mse:b=2/v=tq-mse:b=2", 64), 2.25);
  // tq-prod b=3: 2-bit codes (16) + 64 QJL signs (8) + scale and residual norm (4) = 28;
  // V tq-mse b=3: 24 + 2 = 26; (28 + 26) * 8 / 128.
  EXPECT_DOUBLE_EQ(kv_bits_per_coord("k=tq-prod:b=3/v=tq-mse:b=3", 64), 54 * 8 / 128.0);
  // q4_0: 2 blocks of 18 bytes = 36: 4.5 bits; q8_0: 2 x 34 = 68: 8.5 bits; rotation costs nothing.
  EXPECT_DOUBLE_EQ(kv_bits_per_coord("q4_0", 64), 4.5);
  EXPECT_DOUBLE_EQ(kv_bits_per_coord("q4_0-had", 64), 4.5);
  EXPECT_DOUBLE_EQ(kv_bits_per_coord("q8_0", 64), 8.5);
  EXPECT_DOUBLE_EQ(kv_bits_per_coord("dense-f16", 64), 16.0);
  // head_dim 128 (format.hpp's reference budgets): paper_mse K 50 + V 66 bytes.
  EXPECT_DOUBLE_EQ(kv_bits_per_coord("paper_mse", 128), 116 * 8 / 256.0);
  EXPECT_THROW(kv_bits_per_coord("nope", 64), Error);
}

TEST(SweepBits, BitsPerCoordEqualTheCachesUsedBytes) {
  const int n_layers = 2, n_heads_kv = 3, head_dim = 64, n_tokens = 37;
  std::mt19937 rng(11);
  std::normal_distribution<float> g;
  std::vector<float> k(size_t(n_tokens) * n_heads_kv * head_dim), v(k.size());
  for (auto& x : k) x = g(rng);
  for (auto& x : v) x = g(rng);
  for (const char* p : {"turbo4", "turbo2.5", "turbo3.5", "k=tq-mse:b=2/v=tq-mse:b=2", "k=tq-prod:b=2/v=tq-mse:b=2",
                        "k=tq-prod:b=4/v=tq-mse:b=4", "q4_0", "q8_0-had", "paper_mse", "dense-f16"}) {
    KvCache cache(KvCacheConfig::from_preset(p, n_layers, n_heads_kv, head_dim));
    const int seq = cache.add_sequence();
    for (int l = 0; l < n_layers; ++l) cache.append(seq, l, k.data(), v.data(), n_tokens);
    const double coords = 2.0 * n_tokens * n_layers * n_heads_kv * head_dim;
    EXPECT_DOUBLE_EQ(8.0 * double(cache.memory().used.total()) / coords, kv_bits_per_coord(p, head_dim)) << p;
  }
}

// ---- With the real model ------------------------------------------------------------

std::string model_path(const std::string& name) {
  for (const auto& m : known_models())
    if (m.name == name) {
      const std::string p = model_cache_dir() + "/" + m.file;
      if (std::filesystem::exists(p)) return p;
    }
  return "";
}

TEST(NeedleModel, DenseSmolLM2FindsTheKeyInAShortHaystack) {
  const std::string path = model_path("smollm2-135m");
  if (path.empty())
    GTEST_SKIP() << "model smollm2-135m not in " << model_cache_dir() << " (run: tq models pull smollm2-135m)";
  auto model = Model::load(path);
  const Tokenizer tok = Tokenizer::from_gguf(model->file());
  std::string filler;
  try {
    filler = default_eval_text("prose").text;
  } catch (const Error& e) {
    std::printf("[  NOTE    ] %s; using the repeated filler\n", e.what());
    filler = kNeedleRepeatFiller;
  }
  NeedleOptions o;
  o.lengths = {256};
  o.depths = {0, 50};
  o.threads = 2;
  const auto trials = needle_run(*model, tok, filler, {"dense-f16"}, o);
  ASSERT_EQ(trials.size(), 2u);
  for (const auto& t : trials) {
    std::printf("[  INFO    ] depth %.0f%% (at %.1f%%): key %s, answer \"%s\"\n", t.depth, t.depth_actual,
                t.passkey.c_str(), t.answer.c_str());
    EXPECT_TRUE(t.correct) << "depth " << t.depth << ": key " << t.passkey << ", answer \"" << t.answer << "\"";
  }
  // The frame with the chat template is the ChatML one, and the plain one ends with the question.
  const NeedleFrame chat = needle_frame(tok, true), plain = needle_frame(tok, false);
  EXPECT_NE(tok.decode(chat.head).find("<|im_start|>user"), std::string::npos) << tok.decode(chat.head);
  EXPECT_NE(tok.decode(chat.tail).find("<|im_start|>assistant\nThe pass key is"), std::string::npos);
  EXPECT_EQ(tok.decode(plain.tail), "\n\nWhat is the pass key? The pass key is");
  // A length beyond the context is refused.
  o.lengths = {model->config().context_length + 1};
  EXPECT_THROW(needle_run(*model, tok, filler, {"dense-f16"}, o), Error);
}

}  // namespace
}  // namespace tq
