// The named KV presets and the cache configuration checks.
#include <algorithm>
#include <charconv>
#include <cmath>

#include "turboquant/error.hpp"
#include "turboquant/kv_cache.hpp"

namespace tq {

const std::vector<KvPreset>& kv_presets() {
  static const std::vector<KvPreset> presets = {
      {"paper_mse", "tq-mse:b=3", "tq-mse:b=4", "TurboQuant paper: K MSE 3 bits, V MSE 4 bits"},
      {"paper_mse-out", "tq-mse:b=3,hi=12.5%,hb=6", "tq-mse:b=4",
       "K MSE 3 bits, each head's largest 1/8 of channels at 6 bits (own rotation and scale); V MSE 4 bits"},
      {"paper_prod", "tq-prod:b=3", "tq-mse:b=4",
       "TurboQuant paper: K prod 3 bits in total (2-bit MSE + 1-bit QJL), V MSE 4 bits"},
      {"polarquant", "polar", "tq-mse:b=4", "K PolarQuant (4 levels, 4/2-bit angles), V MSE 4 bits"},
      {"turbo4", "tq-mse:b=4", "tq-mse:b=4", "K and V MSE 4 bits"},
      {"turbo4-out", "tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4",
       "K MSE 4 bits, each head's largest 1/8 of channels at 6 bits (own rotation and scale); V MSE 4 bits"},
      {"turbo3.5", "tq-mse:b=3.5", "tq-mse:b=3.5", "K and V MSE 3.5 bits (channel split)"},
      {"turbo3", "tq-mse:b=3", "tq-mse:b=3", "K and V MSE 3 bits"},
      {"turbo2.5", "tq-mse:b=2.5", "tq-mse:b=2.5", "K and V MSE 2.5 bits (channel split)"},
      {"dense-f16", "f16", "f16", "dense fp16"},
      {"dense-bf16", "bf16", "bf16", "dense bf16"},
      {"dense-f32", "f32", "f32", "dense fp32"},
      {"q8_0", "q8_0", "q8_0", "llama.cpp q8_0 blocks (32 x int8 + fp16 scale)"},
      {"q4_0", "q4_0", "q4_0", "llama.cpp q4_0 blocks (32 x 4 bits + fp16 scale)"},
      {"q8_0-had", "q8_0:rot=hadamard", "q8_0:rot=hadamard", "q8_0 after a randomized Hadamard rotation"},
      {"q4_0-had", "q4_0:rot=hadamard", "q4_0:rot=hadamard", "q4_0 after a randomized Hadamard rotation"},
  };
  return presets;
}

namespace {

// The parts of a layer policy "LAYERS=PRESET+LAYERS=PRESET...", each checked
// for its shape and its preset name.
struct PolicyPart {
  std::string layers;
  KvPreset preset;
};
std::vector<PolicyPart> policy_parts(std::string_view policy) {
  std::vector<PolicyPart> out;
  for (size_t pos = 0; pos <= policy.size();) {
    size_t end = policy.find('+', pos);
    if (end == std::string_view::npos) end = policy.size();
    const std::string_view part = policy.substr(pos, end - pos);
    pos = end + 1;
    const size_t eq = part.find('=');
    TQ_REQUIRE(eq != std::string_view::npos && eq > 0 && eq + 1 < part.size(), "layer policy '", policy,
               "': part '", part, "' is not LAYERS=PRESET");
    out.push_back({std::string(part.substr(0, eq)), find_kv_preset(part.substr(eq + 1))});
  }
  return out;
}

}  // namespace

KvPreset find_kv_preset(std::string_view name) {
  // "BASE+LAYERS=PRESET+...": the base preset with a layer policy, resolved
  // against the model's layers by KvCacheConfig::from_preset.
  if (const size_t plus = name.find('+'); plus != std::string_view::npos) {
    KvPreset p = find_kv_preset(name.substr(0, plus));
    policy_parts(name.substr(plus + 1));  // checks each part's shape and preset
    p.description += " (layers: " + std::string(name.substr(plus + 1)) + ")";
    p.name = std::string(name);
    return p;
  }
  std::string n(name);
  if (n == "paper_prod_qjl") n = "paper_prod";
  for (const auto& p : kv_presets())
    if (p.name == n) return p;
  // "k=SPEC/v=SPEC"
  if (n.rfind("k=", 0) == 0) {
    const size_t slash = n.find("/v=");
    TQ_REQUIRE(slash != std::string::npos, "KV preset '", n, "': expected k=SPEC/v=SPEC");
    KvPreset p{n, n.substr(2, slash - 2), n.substr(slash + 3), "custom"};
    parse_format(p.k_spec);
    parse_format(p.v_spec);
    return p;
  }
  std::string valid;
  for (const auto& p : kv_presets()) valid += (valid.empty() ? "" : ", ") + p.name;
  TQ_THROW("unknown KV preset '", name, "' (valid: ", valid,
           ", paper_prod_qjl, or k=SPEC/v=SPEC with format specs)");
}

KvCacheConfig KvCacheConfig::from_preset(std::string_view preset, int n_layers, int n_heads_kv,
                                         int head_dim,
                                         const std::map<std::string, std::vector<int>>& named_layers) {
  const KvPreset p = find_kv_preset(preset);
  KvCacheConfig c;
  c.n_layers = n_layers;
  c.n_heads_kv = n_heads_kv;
  c.head_dim = head_dim;
  c.preset = p.name;
  c.k_format = parse_format(p.k_spec);
  c.v_format = parse_format(p.v_spec);
  // A dense preset keeps its own precision everywhere (window, dense layers).
  if (is_dense(c.k_format.method)) c.dense_format = c.k_format;
  if (const size_t plus = preset.find('+'); plus != std::string_view::npos)
    c.layer_formats = parse_layer_formats(preset.substr(plus + 1), n_layers, named_layers);
  c.validate();
  return c;
}

void KvCacheConfig::validate() const {
  TQ_REQUIRE(n_layers >= 1 && n_layers <= 4096, "KV cache: n_layers must be 1..4096, got ", n_layers);
  TQ_REQUIRE(n_heads_kv >= 1 && n_heads_kv <= 1024, "KV cache: n_heads_kv must be 1..1024, got ",
             n_heads_kv);
  TQ_REQUIRE(page_tokens >= 1 && page_tokens <= 65536, "KV cache: page_tokens must be 1..65536, got ",
             page_tokens);
  TQ_REQUIRE(dense_window >= 0, "KV cache: dense_window must be >= 0, got ", dense_window);
  TQ_REQUIRE(dense_prefix >= 0, "KV cache: dense_prefix must be >= 0, got ", dense_prefix);
  TQ_REQUIRE(k_start >= 0, "KV cache: k_start must be >= 0, got ", k_start);
  TQ_REQUIRE(is_dense(dense_format.method), "KV cache: dense_format must be f32, f16 or bf16, got ",
             to_string(dense_format));
  for (int l : dense_layers)
    TQ_REQUIRE(l >= 0 && l < n_layers, "KV cache: dense layer ", l, " is outside 0..", n_layers - 1);
  TQ_REQUIRE(sliding_window.empty() || int(sliding_window.size()) == n_layers,
             "KV cache: sliding_window has ", sliding_window.size(), " entries; expected none or one per layer (",
             n_layers, ")");
  for (size_t l = 0; l < sliding_window.size(); ++l)
    TQ_REQUIRE(sliding_window[l] >= 0, "KV cache: sliding_window of layer ", l, " must be >= 0, got ",
               sliding_window[l]);
  validate_format(k_format, head_dim);
  validate_format(v_format, head_dim);
  validate_format(dense_format, head_dim);
  std::vector<int> seen;
  for (const KvLayerFormat& f : layer_formats) {
    TQ_REQUIRE(f.layer >= 0 && f.layer < n_layers, "KV cache: layer_formats names layer ", f.layer,
               ", outside 0..", n_layers - 1);
    TQ_REQUIRE(std::find(seen.begin(), seen.end(), f.layer) == seen.end(),
               "KV cache: layer_formats names layer ", f.layer, " twice");
    TQ_REQUIRE(std::find(dense_layers.begin(), dense_layers.end(), f.layer) == dense_layers.end(),
               "KV cache: layer ", f.layer, " is both in dense_layers and in layer_formats");
    seen.push_back(f.layer);
    for (const FormatSpec* s : {&f.k_format, &f.v_format}) {
      TQ_REQUIRE(!is_dense(s->method), "KV cache: layer_formats gives layer ", f.layer, " the dense format ",
                 to_string(*s), " (keep it dense with dense_layers)");
      validate_format(*s, head_dim);
    }
  }
}

const FormatSpec& KvCacheConfig::k_format_of(int layer) const {
  for (const KvLayerFormat& f : layer_formats)
    if (f.layer == layer) return f.k_format;
  return k_format;
}
const FormatSpec& KvCacheConfig::v_format_of(int layer) const {
  for (const KvLayerFormat& f : layer_formats)
    if (f.layer == layer) return f.v_format;
  return v_format;
}

std::vector<KvLayerFormat> parse_layer_formats(std::string_view policy, int n_layers,
                                               const std::map<std::string, std::vector<int>>& named) {
  std::vector<KvLayerFormat> out;
  if (policy.empty()) return out;
  for (const auto& [layers, preset] : policy_parts(policy)) {
    std::vector<int> idx;
    if (auto it = named.find(layers); it != named.end()) {
      idx = it->second;
      TQ_REQUIRE(!idx.empty(), "layer policy '", policy, "': this model has no '", layers, "' layers");
    } else {
      for (size_t p = 0; p <= layers.size();) {
        size_t comma = layers.find(',', p);
        if (comma == std::string::npos) comma = layers.size();
        const std::string tok = layers.substr(p, comma - p);
        p = comma + 1;
        int v = 0;
        const auto r = std::from_chars(tok.data(), tok.data() + tok.size(), v);
        std::string names;
        for (const auto& n : named) names += (names.empty() ? "" : ", ") + n.first;
        TQ_REQUIRE(!tok.empty() && r.ec == std::errc() && r.ptr == tok.data() + tok.size(), "layer policy '",
                   policy, "': '", tok, "' is not a layer index", names.empty() ? "" : " or one of: ", names);
        TQ_REQUIRE(v >= -n_layers && v < n_layers, "layer policy '", policy, "': layer ", v,
                   " is outside ", -n_layers, "..", n_layers - 1);
        idx.push_back(v < 0 ? v + n_layers : v);
      }
    }
    for (int l : idx) {
      for (const KvLayerFormat& f : out)
        TQ_REQUIRE(f.layer != l, "layer policy '", policy, "': layer ", l, " is named twice");
      out.push_back({l, parse_format(preset.k_spec), parse_format(preset.v_spec)});
    }
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.layer < b.layer; });
  return out;
}

std::string layer_formats_text(const std::vector<KvLayerFormat>& formats) {
  std::vector<const KvLayerFormat*> by_layer;
  for (const KvLayerFormat& f : formats) by_layer.push_back(&f);
  std::sort(by_layer.begin(), by_layer.end(), [](auto* a, auto* b) { return a->layer < b->layer; });
  std::string s;
  for (const KvLayerFormat* p : by_layer) {
    const KvLayerFormat& f = *p;
    if (!s.empty()) s += '+';
    s.append(std::to_string(f.layer)).append("=k=").append(to_string(f.k_format));
    s.append("/v=").append(to_string(f.v_format));
  }
  return s;
}

}  // namespace tq
