// Llama- and Gemma-family transformer forward pass on GGUF weights, with the
// project's KV cache (dense or any preset).
//
//   auto m = tq::Model::load("SmolLM2-135M-Instruct.Q4_1.gguf");
//   tq::KvCache cache(m->cache_config("paper_mse"));
//   int seq = cache.add_sequence();
//   std::vector<float> logits(m->config().vocab);
//   m->forward(cache, seq, tokens.data(), n, /*pos=*/0, logits.data());  // logits of the last token
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "turboquant/ggml_blocks.hpp"
#include "turboquant/gguf.hpp"
#include "turboquant/kv_cache.hpp"

namespace tq {

// Architectures this runtime implements.
const std::vector<std::string>& supported_architectures();

struct ModelConfig {
  std::string arch;  // llama, gemma, gemma2, gemma3
  std::string name;
  int n_layers = 0, d_model = 0, n_heads = 0, n_heads_kv = 0, head_dim = 0, ffn_dim = 0;
  int vocab = 0, context_length = 0;
  float rms_eps = 1e-5f;
  float rope_base = 10000.0f;        // global layers
  float rope_base_local = 10000.0f;  // sliding-window layers (Gemma 3)
  int rope_dim = 0;
  bool rope_neox = false;            // rotate (i, i + d/2) pairs instead of (2i, 2i+1)
  int sliding_window = 0;
  std::vector<char> layer_local;     // per layer: uses the sliding window
  float attn_softcap = 0.0f, final_softcap = 0.0f;
  float attn_scale = 0.0f;           // 0: 1/sqrt(head_dim)
  bool gemma = false;                // embedding * sqrt(d_model), GeGLU, (1 + w) norms
};

// One weight matrix: rows x cols, each row `cols` elements of ggml blocks.
struct Weight {
  ggml::Type type = ggml::Type::f32;
  int rows = 0, cols = 0;
  const uint8_t* data = nullptr;
  size_t row_bytes = 0;
};

// y[t, r] = sum_c W[r, c] x[t, c] for t < n. x: [n, cols], y: [n, rows].
// Weight rows are decoded in registers (SIMD per block type) and used for up
// to 4 tokens at a time; rows are split across threads.
void matmul(const Weight& w, const float* x, int n, float* y, int threads);

class Model {
 public:
  // Refuses an unsupported architecture before allocating anything, naming
  // it and the supported ones, unless allow_unsupported (then it is run as
  // Llama, with a warning on stderr).
  static std::unique_ptr<Model> load(const std::string& path, bool allow_unsupported = false);
  ~Model();

  const ModelConfig& config() const { return cfg_; }
  const gguf::File& file() const { return file_; }
  // A cache config for this model's shape with a preset (or k=SPEC/v=SPEC),
  // optionally with a layer policy naming "global" (full-attention) or
  // "local" (sliding-window) layers, e.g. "turbo3+global=turbo4-out".
  // The sliding-window layers keep only what their window can still see
  // (KvCacheConfig::sliding_window) and pages shrink to at most 1/8 of the
  // window, unless swa_full: then every token of every layer stays (e.g. to
  // trim back further than a window).
  KvCacheConfig cache_config(const std::string& preset, bool swa_full = false) const;

  // Runs n tokens at positions pos .. pos+n-1 of sequence seq (appending
  // their K/V to the cache). logits: [vocab] of the last token, or [n, vocab]
  // when all_logits.
  void forward(KvCache& cache, int seq, const int32_t* tokens, int n, int pos, float* logits,
               int threads = 1, bool all_logits = false) const;

  struct Layer;

 private:
  Model() = default;
  gguf::File file_;
  ModelConfig cfg_;
  Weight tok_embd_, output_;
  std::vector<float> output_norm_;
  std::vector<Layer> layers_;
};

}  // namespace tq
