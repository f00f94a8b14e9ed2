// Text generation with a model, its tokenizer and a KV cache preset.
//
//   tq::GenerateOptions o;  o.preset = "paper_mse";  o.max_tokens = 32;
//   auto r = tq::generate(*model, tok, "The capital of France is", o,
//                         [](const std::string& piece) { std::fputs(piece.c_str(), stdout); });
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "turboquant/model.hpp"
#include "turboquant/sampler.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq {

struct GenerateOptions {
  std::string preset = "dense-f16";  // KV cache preset (or k=SPEC/v=SPEC)
  int k_start = 0;                   // layers stay dense until they hold k_start tokens
  int dense_window = 0;
  int dense_prefix = 0;  // first S tokens stay dense (attention sinks)
  std::vector<int> dense_layers;
  bool swa_full = false;  // sliding-window layers keep every token (Model::cache_config)
  int max_tokens = 64;
  int prefill_batch = 64;            // tokens per forward call during prefill
  bool chat = false;                 // wrap the prompt in the model's chat template
  bool stop_at_eog = true;
  int threads = 1;
  SamplerParams sampler;
};

struct GenerateResult {
  std::vector<int32_t> prompt_tokens, tokens;  // tokens: the generated ones
  std::string text;                            // decoded generated text
  double prefill_seconds = 0, decode_seconds = 0;
  size_t kv_bytes = 0;        // what the cache holds for these tokens (used bytes)
  size_t kv_bytes_dense = 0;  // the same tokens as f16/bf16 K+V
  bool stopped_at_eog = false;
};

// on_piece receives the generated text as it streams (whole UTF-8 characters).
GenerateResult generate(const Model& model, const Tokenizer& tok, const std::string& prompt,
                        const GenerateOptions& options,
                        const std::function<void(const std::string&)>& on_piece = {});

}  // namespace tq
