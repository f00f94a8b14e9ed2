// Llama and Gemma (1/2/3) forward pass.
//
// Llama: x = embed; per layer: x += Wo attn(rope(Wq n(x)), rope(Wk n(x)), Wv n(x));
//        x += Wdown(silu(Wgate n(x)) * Wup n(x)); logits = Wout n(x). RMSNorm, RoPE on
//        adjacent pairs (the GGUF converter permutes Wq/Wk for that).
// Gemma: embed * sqrt(d_model); GeGLU (tanh GELU); RoPE on (i, i + d/2) pairs;
//        Gemma 2/3 add post-attention and post-FFN norms, Gemma 3 per-head
//        RMSNorm on q and k and interleaved sliding-window layers with their own
//        RoPE base; softcaps where the metadata has them. GGUF norm weights for
//        Gemma already include the +1 of its (1 + w) RMSNorm.
#include "turboquant/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>

#include "turboquant/error.hpp"
#include "turboquant/parallel.hpp"

namespace tq {

struct Model::Layer {
  Weight wq, wk, wv, wo, w_gate, w_up, w_down;
  std::vector<float> attn_norm, ffn_norm, post_attn_norm, post_ffn_norm, q_norm, k_norm;
};

namespace {

std::vector<float> load_vector(const gguf::File& f, const std::string& name, int expect) {
  const gguf::TensorInfo& t = f.tensor(name);
  TQ_REQUIRE(int64_t(t.n_elements) == expect, "tensor '", name, "' has ", t.n_elements,
             " elements, expected ", expect);
  std::vector<float> v(expect);
  ggml::dequantize_row(t.type, t.data, t.n_elements, v.data());
  return v;
}

std::vector<float> load_optional(const gguf::File& f, const std::string& name, int expect) {
  return f.find_tensor(name) ? load_vector(f, name, expect) : std::vector<float>{};
}

Weight load_weight(const gguf::File& f, const std::string& name, int rows, int cols) {
  const gguf::TensorInfo& t = f.tensor(name);
  TQ_REQUIRE(t.dims.size() == 2 && int64_t(t.dims[0]) == cols && int64_t(t.dims[1]) == rows,
             "tensor '", name, "' has shape [", t.dims[0], t.dims.size() > 1 ? ", " : "",
             t.dims.size() > 1 ? std::to_string(t.dims[1]) : std::string(), "], expected [", cols,
             ", ", rows, "]");
  TQ_REQUIRE(ggml::traits(t.type).supported, "tensor '", name, "' has type ",
             ggml::to_string(t.type), ", which this runtime cannot decode");
  Weight w;
  w.type = t.type;
  w.rows = rows;
  w.cols = cols;
  w.data = t.data;
  w.row_bytes = ggml::row_bytes(t.type, cols);
  return w;
}

void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(float(ss / n) + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * inv * (w ? w[i] : 1.0f);
}

// Rotary embedding of one head vector at position pos.
void rope(float* v, int head_dim, int rope_dim, int pos, float base, bool neox) {
  const int half = rope_dim / 2;
  for (int i = 0; i < half; ++i) {
    const double theta = pos * std::pow(double(base), -2.0 * i / rope_dim);
    const float c = float(std::cos(theta)), s = float(std::sin(theta));
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x0 * s + x1 * c;
  }
  (void)head_dim;
}

float gelu_tanh(float x) {
  return 0.5f * x * (1.0f + std::tanh(0.7978845608f * (x + 0.044715f * x * x * x)));
}
float silu(float x) { return x / (1.0f + std::exp(-x)); }

}  // namespace

const std::vector<std::string>& supported_architectures() {
  static const std::vector<std::string> a = {"llama", "gemma", "gemma2", "gemma3"};
  return a;
}

Model::~Model() = default;

std::unique_ptr<Model> Model::load(const std::string& path, bool allow_unsupported) {
  std::unique_ptr<Model> m(new Model());
  m->file_ = gguf::File::open(path);
  const gguf::File& f = m->file_;
  ModelConfig& c = m->cfg_;
  c.arch = f.get_string("general.architecture");
  const auto& sup = supported_architectures();
  if (std::find(sup.begin(), sup.end(), c.arch) == sup.end()) {
    std::string list;
    for (const auto& s : sup) list += (list.empty() ? "" : ", ") + s;
    if (!allow_unsupported)
      TQ_THROW("model '", path, "' has architecture '", c.arch, "', which is not supported (supported: ",
               list, "); --allow-unsupported runs it as llama at your own risk");
    std::fprintf(stderr, "tq: warning: architecture '%s' is unsupported; running it as llama\n",
                 c.arch.c_str());
  }
  const std::string a = c.arch + ".";
  c.name = f.has("general.name") ? f.get_string("general.name") : path;
  c.gemma = c.arch.rfind("gemma", 0) == 0;
  c.n_layers = int(f.get_int(a + "block_count"));
  c.d_model = int(f.get_int(a + "embedding_length"));
  c.n_heads = int(f.get_int(a + "attention.head_count"));
  c.n_heads_kv = int(f.find_int(a + "attention.head_count_kv").value_or(c.n_heads));
  c.head_dim = int(f.find_int(a + "attention.key_length").value_or(c.d_model / c.n_heads));
  c.ffn_dim = int(f.get_int(a + "feed_forward_length"));
  c.context_length = int(f.find_int(a + "context_length").value_or(4096));
  c.rms_eps = float(f.find_float(a + "attention.layer_norm_rms_epsilon").value_or(1e-5));
  c.rope_base = float(f.find_float(a + "rope.freq_base").value_or(10000.0));
  c.rope_dim = int(f.find_int(a + "rope.dimension_count").value_or(c.head_dim));
  c.rope_neox = c.gemma;
  c.sliding_window = int(f.find_int(a + "attention.sliding_window").value_or(0));
  c.attn_softcap = float(f.find_float(a + "attn_logit_softcapping").value_or(0.0));
  c.final_softcap = float(f.find_float(a + "final_logit_softcapping").value_or(0.0));
  if (auto q = f.find_float(a + "attention.query_pre_attn_scalar")) c.attn_scale = float(1.0 / std::sqrt(*q));
  c.layer_local.assign(c.n_layers, 0);
  if (c.sliding_window > 0) {
    for (int l = 0; l < c.n_layers; ++l) {
      if (c.arch == "gemma2") c.layer_local[l] = l % 2 == 0;
      else if (c.arch == "gemma3") c.layer_local[l] = (l + 1) % 6 != 0;
      else c.layer_local[l] = 1;
    }
  }
  TQ_REQUIRE(c.n_layers > 0 && c.d_model > 0 && c.n_heads > 0 && c.n_heads_kv > 0 &&
                 c.n_heads % c.n_heads_kv == 0 && c.head_dim > 0 && c.rope_dim <= c.head_dim,
             "model '", path, "': inconsistent shape (layers ", c.n_layers, ", d_model ", c.d_model,
             ", heads ", c.n_heads, "/", c.n_heads_kv, ", head_dim ", c.head_dim, ")");

  const gguf::TensorInfo& emb = f.tensor("token_embd.weight");
  TQ_REQUIRE(emb.dims.size() == 2, "token_embd.weight must be 2-D");
  c.vocab = int(emb.dims[1]);
  m->tok_embd_ = load_weight(f, "token_embd.weight", c.vocab, c.d_model);
  m->output_ = f.find_tensor("output.weight") ? load_weight(f, "output.weight", c.vocab, c.d_model)
                                              : m->tok_embd_;
  m->output_norm_ = load_vector(f, "output_norm.weight", c.d_model);
  const int q_dim = c.n_heads * c.head_dim, kv_dim = c.n_heads_kv * c.head_dim;
  m->layers_.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    Layer& L = m->layers_[l];
    L.wq = load_weight(f, p + "attn_q.weight", q_dim, c.d_model);
    L.wk = load_weight(f, p + "attn_k.weight", kv_dim, c.d_model);
    L.wv = load_weight(f, p + "attn_v.weight", kv_dim, c.d_model);
    L.wo = load_weight(f, p + "attn_output.weight", c.d_model, q_dim);
    L.w_gate = load_weight(f, p + "ffn_gate.weight", c.ffn_dim, c.d_model);
    L.w_up = load_weight(f, p + "ffn_up.weight", c.ffn_dim, c.d_model);
    L.w_down = load_weight(f, p + "ffn_down.weight", c.d_model, c.ffn_dim);
    L.attn_norm = load_vector(f, p + "attn_norm.weight", c.d_model);
    L.ffn_norm = load_vector(f, p + "ffn_norm.weight", c.d_model);
    L.post_attn_norm = load_optional(f, p + "post_attention_norm.weight", c.d_model);
    L.post_ffn_norm = load_optional(f, p + "post_ffw_norm.weight", c.d_model);
    L.q_norm = load_optional(f, p + "attn_q_norm.weight", c.head_dim);
    L.k_norm = load_optional(f, p + "attn_k_norm.weight", c.head_dim);
  }
  return m;
}

KvCacheConfig Model::cache_config(const std::string& preset, bool swa_full) const {
  std::map<std::string, std::vector<int>> named = {{"global", {}}, {"local", {}}};
  for (int l = 0; l < cfg_.n_layers; ++l) named[cfg_.layer_local[l] ? "local" : "global"].push_back(l);
  KvCacheConfig c = KvCacheConfig::from_preset(preset, cfg_.n_layers, cfg_.n_heads_kv, cfg_.head_dim, named);
  // forward() attends a local layer with window = sliding_window, no sinks.
  if (!swa_full && cfg_.sliding_window > 0 && !named["local"].empty()) {
    c.sliding_window.assign(size_t(cfg_.n_layers), 0);
    for (int l : named["local"]) c.sliding_window[size_t(l)] = cfg_.sliding_window;
    // A local layer frees whole pages, so it holds up to window + page
    // tokens: pages of at most an eighth of the window (Gemma 3's 512: 64
    // tokens) keep that within 1/8 of the window; multiples of 16 (the GPU
    // decode kernel's tile), 16 .. 256.
    c.page_tokens = std::clamp(cfg_.sliding_window / 8 / 16 * 16, 16, c.page_tokens);
  }
  return c;
}

void Model::forward(KvCache& cache, int seq, const int32_t* tokens, int n, int pos, float* logits,
                    int threads, bool all_logits) const {
  const ModelConfig& c = cfg_;
  TQ_REQUIRE(n >= 1, "forward: n_tokens must be >= 1, got ", n);
  const KvCacheConfig& kc = cache.config();
  TQ_REQUIRE(kc.n_layers == c.n_layers && kc.n_heads_kv == c.n_heads_kv && kc.head_dim == c.head_dim,
             "forward: the KV cache shape (", kc.n_layers, " layers, ", kc.n_heads_kv, " heads x ",
             kc.head_dim, ") does not match the model (", c.n_layers, " x ", c.n_heads_kv, " x ",
             c.head_dim, ")");
  for (int t = 0; t < n; ++t)
    TQ_REQUIRE(tokens[t] >= 0 && tokens[t] < c.vocab, "forward: token id ", tokens[t],
               " is outside the vocabulary 0..", c.vocab - 1);
  const int D = c.d_model, q_dim = c.n_heads * c.head_dim, kv_dim = c.n_heads_kv * c.head_dim;
  std::vector<float> x(size_t(n) * D), h(size_t(n) * D), q(size_t(n) * q_dim), k(size_t(n) * kv_dim),
      v(size_t(n) * kv_dim), att(size_t(n) * q_dim), o(size_t(n) * D), gate(size_t(n) * c.ffn_dim),
      up(size_t(n) * c.ffn_dim);

  for (int t = 0; t < n; ++t) {
    ggml::dequantize_row(tok_embd_.type, tok_embd_.data + size_t(tokens[t]) * tok_embd_.row_bytes, D,
                         &x[size_t(t) * D]);
    if (c.gemma) {
      const float s = std::sqrt(float(D));
      for (int i = 0; i < D; ++i) x[size_t(t) * D + i] *= s;
    }
  }

  for (int l = 0; l < c.n_layers; ++l) {
    const Layer& L = layers_[l];
    for (int t = 0; t < n; ++t) rms_norm(&x[size_t(t) * D], L.attn_norm.data(), D, c.rms_eps, &h[size_t(t) * D]);
    matmul(L.wq, h.data(), n, q.data(), threads);
    matmul(L.wk, h.data(), n, k.data(), threads);
    matmul(L.wv, h.data(), n, v.data(), threads);
    const float base = c.layer_local[l] && c.arch == "gemma3" ? c.rope_base_local : c.rope_base;
    for (int t = 0; t < n; ++t) {
      for (int hh = 0; hh < c.n_heads; ++hh) {
        float* qv = &q[size_t(t) * q_dim + size_t(hh) * c.head_dim];
        if (!L.q_norm.empty()) rms_norm(qv, L.q_norm.data(), c.head_dim, c.rms_eps, qv);
        rope(qv, c.head_dim, c.rope_dim, pos + t, base, c.rope_neox);
      }
      for (int hh = 0; hh < c.n_heads_kv; ++hh) {
        float* kv = &k[size_t(t) * kv_dim + size_t(hh) * c.head_dim];
        if (!L.k_norm.empty()) rms_norm(kv, L.k_norm.data(), c.head_dim, c.rms_eps, kv);
        rope(kv, c.head_dim, c.rope_dim, pos + t, base, c.rope_neox);
      }
    }
    TQ_REQUIRE(cache.n_tokens(seq, l) == pos, "forward: layer ", l, " of sequence ", seq, " holds ",
               cache.n_tokens(seq, l), " tokens, but the new tokens start at position ", pos);
    cache.append(seq, l, k.data(), v.data(), n);
    AttentionParams ap;
    ap.scale = c.attn_scale;
    ap.softcap = c.attn_softcap;
    ap.window = c.layer_local[l] ? c.sliding_window : 0;
    cache.attend_prefill(seq, l, q.data(), n, c.n_heads, pos, ap, att.data(), threads);
    matmul(L.wo, att.data(), n, o.data(), threads);
    for (int t = 0; t < n; ++t) {
      float* ot = &o[size_t(t) * D];
      if (!L.post_attn_norm.empty()) rms_norm(ot, L.post_attn_norm.data(), D, c.rms_eps, ot);
      for (int i = 0; i < D; ++i) x[size_t(t) * D + i] += ot[i];
      rms_norm(&x[size_t(t) * D], L.ffn_norm.data(), D, c.rms_eps, &h[size_t(t) * D]);
    }
    matmul(L.w_gate, h.data(), n, gate.data(), threads);
    matmul(L.w_up, h.data(), n, up.data(), threads);
    for (size_t i = 0; i < gate.size(); ++i)
      gate[i] = (c.gemma ? gelu_tanh(gate[i]) : silu(gate[i])) * up[i];
    matmul(L.w_down, gate.data(), n, o.data(), threads);
    for (int t = 0; t < n; ++t) {
      float* ot = &o[size_t(t) * D];
      if (!L.post_ffn_norm.empty()) rms_norm(ot, L.post_ffn_norm.data(), D, c.rms_eps, ot);
      for (int i = 0; i < D; ++i) x[size_t(t) * D + i] += ot[i];
    }
  }

  const int first = all_logits ? 0 : n - 1;
  const int n_out = n - first;
  for (int t = first; t < n; ++t)
    rms_norm(&x[size_t(t) * D], output_norm_.data(), D, c.rms_eps, &h[size_t(t - first) * D]);
  matmul(output_, h.data(), n_out, logits, threads);
  if (c.final_softcap > 0)
    for (size_t i = 0; i < size_t(n_out) * c.vocab; ++i)
      logits[i] = c.final_softcap * std::tanh(logits[i] / c.final_softcap);
}

}  // namespace tq
