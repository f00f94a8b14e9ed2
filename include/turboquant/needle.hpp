// Needle in a haystack: can a model still find one fact in a long prompt when
// its KV cache is compressed? A random pass key (5-7 digits) is hidden at a
// depth of 0-100% in filler text, the prompt asks for it, a few tokens are
// decoded greedily, and a trial counts as correct when the answer contains the
// key. Every preset sees exactly the same prompts (issue 6 §3; results in
// docs/quality.md).
//
//   auto m = tq::Model::load(tq::resolve_model("smollm2-135m"));
//   auto tok = tq::Tokenizer::from_gguf(m->file());
//   tq::NeedleOptions o;
//   o.lengths = {1024, 2048};
//   o.depths = {0, 50, 100};
//   auto trials = tq::needle_run(*m, tok, tq::default_eval_text("prose").text,
//                                {"dense-f16", "turbo4"}, o);
//   for (const auto& c : tq::needle_summary(trials, /*by_depth=*/false))
//     std::printf("%s %d: %d/%d\n", c.preset.c_str(), c.length, c.correct, c.total);
//
// The prompt is built in token space, so its length is exact: a frame (a head
// with the instruction, a tail with the question and the start of the answer
// "The pass key is", in the chat template if asked), filler sentences, each
// tokenized on its own with its leading whitespace, and the needle sentence
// inserted at the sentence boundary nearest the requested depth. The last
// filler sentence is cut at a token so that prompt + answer tokens == length.
// Prompt construction and scoring take the frame and an encoder, not a model,
// so tests run them with a toy tokenizer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace tq {

class Model;
class Tokenizer;

// ---- Prompt construction (no model needed) -----------------------------------

// Text -> token ids, no BOS and no special tokens (Tokenizer::encode(s, false)).
using NeedleEncoder = std::function<std::vector<int32_t>(std::string_view)>;

// The classic filler of the pass-key test (Mohtashami & Jaggi 2023), repeated.
constexpr const char* kNeedleRepeatFiller =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

// Sentences of a text: each piece starts with the whitespace before it and
// ends after its '.', '!' or '?' (closing quotes and brackets included) or at
// a line break, so that concatenating them gives the text back exactly.
std::vector<std::string> needle_split_sentences(std::string_view text);

// The filler cut into sentences and tokenized once.
struct NeedleFiller {
  std::vector<std::vector<int32_t>> sentences;  // non-empty token lists
};
// Throws tq::Error when the text has no sentence.
NeedleFiller needle_make_filler(std::string_view text, const NeedleEncoder& encode);

// What wraps the haystack. head: [BOS] + template + instruction; tail:
// question + template + "The pass key is".
struct NeedleFrame {
  std::vector<int32_t> head, tail;
};
// The model's chat template when chat and the tokenizer has one
// (Tokenizer::chat_format() != none), else the plain prompt
// "<instruction>\n\n<haystack>\n\nWhat is the pass key? The pass key is".
// The plain prompt is the default of needle_run: SmolLM2-135M-Instruct, dense,
// found 3 of 5 keys at 1024 positions with it and 1 of 5 with its ChatML
// template (which it answers with "a code that is used to ...").
NeedleFrame needle_frame(const Tokenizer& tok, bool chat);

// " The pass key is 71432. Remember it. 71432 is the pass key."
std::string needle_sentence(std::string_view passkey);
// A 5- to 7-digit key (no leading zero), a function of the seed only.
std::string needle_passkey(uint64_t seed);

struct NeedlePrompt {
  std::vector<int32_t> ids;  // the whole prompt
  std::string passkey;
  int needle_begin = 0;      // index in ids of the needle sentence's first token
  int needle_end = 0;        // one past its last token
  int filler_begin = 0;      // the haystack: ids[filler_begin, filler_end), needle included
  int filler_end = 0;
  double depth = 0;          // realised depth in %: filler tokens before the needle / all filler tokens
};

// A prompt of exactly `prompt_tokens` tokens with the needle at the sentence
// boundary nearest `depth_pct` percent of the filler (0: first, 100: last,
// right before the question). The filler starts at sentence `first_sentence`
// (mod the sentence count) and wraps around when it runs out. Throws
// tq::Error when the frame and the needle leave no room for filler.
NeedlePrompt needle_build_prompt(const NeedleFiller& filler, const NeedleFrame& frame,
                                 const std::vector<int32_t>& needle, std::string_view passkey,
                                 int prompt_tokens, double depth_pct, size_t first_sentence);

// True when some maximal run of digits in `answer` equals `passkey`
// ("... is 71432." yes; "714320" or "7143" no).
bool needle_found(std::string_view answer, std::string_view passkey);

// ---- Running it on a model -----------------------------------------------------

struct NeedleOptions {
  std::vector<int> lengths = {1024};         // positions: prompt + answer tokens
  std::vector<double> depths = {0, 25, 50, 75, 100};  // percent
  int trials = 1;                            // prompts per (length, depth), each its own key and filler offset
  uint64_t seed = 1;
  int answer_tokens = 12;                    // greedy tokens decoded (the key is at most 7 digits)
  bool chat = false;                         // use the chat template when the model has one (see needle_frame)
  int k_start = 0;                           // positions attended densely before the upgrade
  int chunk = 128;                           // prefill positions per forward call
  int threads = 1;
  int dense_window = 0;                      // applied to every preset's cache
  int dense_prefix = 0;                      // first S tokens dense (attention sinks)
  std::vector<int> dense_layers;             // applied to every preset's cache
  bool swa_full = false;                     // sliding-window layers keep every token (Model::cache_config)
  // After each forward call: positions run so far (all presets), and the total.
  std::function<void(size_t done, size_t total)> progress;
};

struct NeedleTrial {
  std::string preset;
  int length = 0;
  double depth = 0;         // requested, percent
  double depth_actual = 0;  // realised, percent
  int trial = 0;
  std::string passkey, answer;
  bool correct = false;
  // The cache after the answer: its used bytes (KvMemoryReport::used), the
  // positions it was run over, and what that is per coordinate of every
  // position: 8 kv_bytes / (positions x n_layers x n_heads_kv x 2 head_dim)
  // (16 for a dense f16 cache that keeps every position; less where a
  // sliding-window layer freed positions or a format compresses).
  size_t kv_bytes = 0;
  int positions = 0;
  double kv_bits_per_coord = 0;
};

// The seed of one prompt: a function of (seed, length, depth index, trial),
// so adding a preset or a length never changes the other prompts.
uint64_t needle_trial_seed(uint64_t seed, int length, size_t depth_index, int trial);

// One trial per (length, depth, trial, preset), in that order; each prompt is
// built once and run with every preset. filler_text: the haystack source (the
// default prose, or kNeedleRepeatFiller). Throws tq::Error naming a bad option,
// preset or length (over the model's context, or too short for the frame).
std::vector<NeedleTrial> needle_run(const Model& model, const Tokenizer& tok, std::string_view filler_text,
                                    const std::vector<std::string>& presets, const NeedleOptions& opt);

// Accuracy per (preset, length) or, by_depth, per (preset, length, depth),
// in the order of first appearance.
struct NeedleCell {
  std::string preset;
  int length = 0;
  double depth = -1;  // -1: all depths
  int correct = 0, total = 0;
  double kv_bits_per_coord = 0;  // mean over the cell's trials
  double accuracy() const { return total ? double(correct) / total : 0.0; }
};
std::vector<NeedleCell> needle_summary(const std::vector<NeedleTrial>& trials, bool by_depth);

// ---- Bit budget of a preset (tq sweep) -------------------------------------------
// Storage bits per coordinate of K and V together, scales and norms included:
// 8 (bytes(K record) + bytes(V record)) / (2 head_dim). Equals the cache's
// used bytes per token, layer and head, times 8 / (2 head_dim).
double kv_bits_per_coord(std::string_view preset, int head_dim);

}  // namespace tq
