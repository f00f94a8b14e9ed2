// The compressed KV cache: keys and values of every layer and KV head stored
// as TurboQuant (or baseline) records in fixed-size token pages, with decode
// attention run directly on the records.
//
//   auto cfg = tq::KvCacheConfig::from_preset("paper_mse", n_layers, n_heads_kv, head_dim);
//   tq::KvCache cache(cfg);
//   int seq = cache.add_sequence();
//   cache.append(seq, layer, k, v, n_tokens);   // k, v: [n_tokens, n_heads_kv, head_dim]
//   cache.attend(seq, layer, q, n_heads_q, params, out);  // q, out: [n_heads_q, head_dim]
//
// Storage of one (sequence, layer):
//   [dense prefix: the first <= S tokens][main pages: the next n_main tokens]
//   [dense window: the newest <= W tokens]
// Main pages hold the layer's compressed format, or the dense format while the
// layer is dense (a layer kept dense by policy, or before its upgrade when
// k_start > 0). The prefix keeps the sequence's first S tokens dense for good:
// they are the attention sinks that most queries attend to most, so an error
// in their keys moves every softmax. The window holds the newest tokens in the dense format; a token
// that ages out of it is encoded into the pages. Pages never move once
// written; trim() and clear() release them.
//
// Sliding-window layers (KvCacheConfig::sliding_window, e.g. Gemma's local
// layers): a query there sees only the newest W positions, so once a whole
// page (or the dense prefix) lies before every position a later query can
// see, the cache frees it ("evicts" it). Attention results do not change;
// the layer's memory stops growing at about W + page_tokens tokens.
// n_tokens() still counts positions from 0; a query that would need an
// evicted position is refused with an error, never answered from less.
//
// Thread safety: different sequences may be appended to, trimmed and attended
// from different threads at once; one sequence is used by one thread at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "turboquant/attention.hpp"
#include "turboquant/format.hpp"
#include "turboquant/quantizer.hpp"

namespace tq {

struct KvPreset {
  std::string name;
  std::string k_spec, v_spec;
  std::string description;
};
// The named presets (paper_mse, paper_prod, polarquant, turbo4, ..., q4_0).
const std::vector<KvPreset>& kv_presets();
// A preset by name or alias, or "k=SPEC/v=SPEC" for any pair of formats,
// optionally followed by a layer policy "+LAYERS=PRESET[+LAYERS=PRESET...]"
// (parse_layer_formats; e.g. "turbo3+global=turbo4-out"); the returned
// formats are the base preset's. Throws tq::Error listing the valid names.
KvPreset find_kv_preset(std::string_view name);

// Layer policy: a layer whose compressed K / V formats are not the cache's
// k_format / v_format (e.g. Gemma 3's global-attention layers at 4 bits with
// outlier channels while its sliding-window layers take 3 bits).
struct KvLayerFormat {
  int layer = 0;
  FormatSpec k_format, v_format;
};

struct KvCacheConfig {
  int n_layers = 1;
  int n_heads_kv = 1;
  int head_dim = 128;
  std::string preset = "custom";
  FormatSpec k_format = parse_format("tq-mse:b=4");
  FormatSpec v_format = parse_format("tq-mse:b=4");
  FormatSpec dense_format = parse_format("f16");  // dense layers, window, before upgrade
  int page_tokens = 256;
  int dense_window = 0;            // newest W tokens stay dense
  int dense_prefix = 0;            // first S tokens of every sequence stay dense (sinks)
  std::vector<int> dense_layers;   // layer policy: these layers are never compressed
  std::vector<KvLayerFormat> layer_formats;  // layer policy: these layers use their own formats
  int k_start = 0;                 // > 0: layers stay dense until they hold k_start tokens
  // Per layer (empty = none): W > 0 marks a sliding-window layer, attended
  // with AttentionParams::window <= W and no sinks; the cache frees its pages
  // that no query at a position >= (tokens before the newest append) can see.
  // 0 keeps every token. Model::cache_config fills it from the model.
  std::vector<int> sliding_window;
  uint64_t seed = 0;

  // `named_layers` resolves names in a preset's layer policy (a model passes
  // "global" and "local": its full-attention and sliding-window layers).
  static KvCacheConfig from_preset(std::string_view preset, int n_layers, int n_heads_kv, int head_dim,
                                   const std::map<std::string, std::vector<int>>& named_layers = {});
  void validate() const;  // throws tq::Error naming the bad field
  // The compressed formats of a layer: its layer_formats entry, else k_format / v_format.
  const FormatSpec& k_format_of(int layer) const;
  const FormatSpec& v_format_of(int layer) const;
};

// A layer policy string, "LAYERS=PRESET[+LAYERS=PRESET...]": LAYERS is a comma
// list of layer indices (negative: from the end) or a name of `named` (e.g.
// "global" for a model's full-attention layers); PRESET a KV preset name or
// k=SPEC/v=SPEC. A layer named twice is an error. Throws tq::Error naming the
// bad part.
std::vector<KvLayerFormat> parse_layer_formats(std::string_view policy, int n_layers,
                                               const std::map<std::string, std::vector<int>>& named = {});
// The policy back as text, "L=k=SPEC/v=SPEC" per layer in layer order, joined
// by '+' (parse_layer_formats reads it back).
std::string layer_formats_text(const std::vector<KvLayerFormat>& formats);

// Bytes by component. `allocated` is what the cache holds in memory now
// (whole pages and window buffers); `used` counts only the stored tokens.
struct KvMemory {
  size_t codes = 0, scales = 0, sketch = 0;  // compressed pages
  size_t dense = 0;                          // dense pages and dense windows
  size_t total() const { return codes + scales + sketch + dense; }
};
struct KvMemoryReport {
  KvMemory allocated, used;
  size_t tokens = 0;              // stored tokens, summed over sequences and layers
  size_t evicted = 0;             // positions freed by sliding windows (not in `tokens`)
  size_t dense_equivalent = 0;    // bytes the stored tokens take as bf16 K+V
};

class KvCache {
 public:
  explicit KvCache(KvCacheConfig config);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const KvCacheConfig& config() const { return cfg_; }
  // The compressed K / V format's quantizer of a layer and KV head. For a
  // channel-split format (fractional b, or hi=N,hb=B) each head codes its own
  // outlier channels at the higher width: the channels with the largest mean
  // square over the first tokens (up to 4096) that the layer compresses,
  // chosen once per layer when it first compresses and kept for the cache's
  // lifetime (trim and clear keep them; save/load carry them). Before that,
  // and for other formats, every head shares one quantizer.
  const Quantizer& k_quantizer(int layer, int head = 0) const;
  const Quantizer& v_quantizer(int layer, int head = 0) const;
  // The channels a head codes at the higher width (ascending); empty for a
  // format without a channel split or before the layer's calibration.
  std::vector<int> outlier_channels(int layer, int head, bool key) const;

  // The sliding window of a layer (0: keeps every token).
  int sliding_window_of(int layer) const;

  int add_sequence();
  void remove_sequence(int seq);
  std::vector<int> sequences() const;
  int n_tokens(int seq, int layer) const;  // positions appended (evicted ones included)
  // The first position still stored: 0 unless a sliding window evicted the
  // positions before it.
  int first_stored(int seq, int layer) const;
  bool is_compressed(int seq, int layer) const;  // main pages hold the compressed format

  // k, v: [n_tokens, n_heads_kv, head_dim]. NaN/Inf is refused (tq::Error,
  // the cache unchanged).
  void append(int seq, int layer, const float* k, const float* v, int n_tokens);
  // Keeps the first n_tokens of every layer of the sequence. Tokens that were
  // already compressed stay compressed (the window only holds what remained in it).
  // A sliding-window layer that evicted positions can go back to n_tokens >=
  // first_stored + W - 1 (always to the length before the last append), or
  // to 0; anything between throws tq::Error and changes nothing.
  void trim(int seq, int n_tokens);
  void clear();  // every sequence to zero tokens, pages released

  // Converts every dense layer (not kept dense by policy) holding >= k_start
  // tokens to the compressed format; idempotent. Returns the layers converted.
  int upgrade(int k_start);

  // Decode attention for one query token at position q_pos (default: the
  // last token). q, out: [n_heads_q, head_dim]; n_heads_q a multiple of
  // n_heads_kv (GQA). lse (optional): [n_heads_q]. threads <= 0: all cores.
  void attend(int seq, int layer, const float* q, int n_heads_q, const AttentionParams& params,
              float* out, float* lse = nullptr, int q_pos = -1, int threads = 1) const;
  // Several query tokens (chunked prefill) at positions pos0 .. pos0+n_q-1,
  // causal. q, out: [n_q, n_heads_q, head_dim].
  void attend_prefill(int seq, int layer, const float* q, int n_q, int n_heads_q, int pos0,
                      const AttentionParams& params, float* out, int threads = 1) const;

  // The decoded (dequantized) keys and values of a sequence's layer, e.g. for
  // checks against dense attention. k, v: [n_tokens, n_heads_kv, head_dim]
  // (tq::Error if a sliding window evicted any of them).
  void dequantize(int seq, int layer, float* k, float* v) const;

  // Raw compressed records, e.g. to move a layer to or from a GPU KV layer
  // (cuda.hpp: GpuKvLayer::append_records / read_records, same record bytes).
  // k: [n, n_heads_kv, k_quantizer(layer).bytes_per_vector()], v likewise.
  // read_records: tokens [t0, t0 + n) of a compressed layer of the sequence
  // (compressed tokens only: not the dense prefix or window).
  // append_records: appends them after the sequence's last token; needs a
  // compressed layer, dense_window 0, a full dense prefix (if any) and a
  // format without calibrated outlier
  // channels (its per-head quantizers would have to travel too). Every record
  // is decoded first: a non-finite one is refused (tq::Error, the cache
  // unchanged).
  void read_records(int seq, int layer, int t0, int n, uint8_t* k, uint8_t* v) const;
  void append_records(int seq, int layer, const uint8_t* k, const uint8_t* v, int n);

  KvMemoryReport memory() const;
  size_t bytes_allocated() const;  // what the page and window allocators really hold

  // ---- Saved state --------------------------------------------------------
  // Writes the config (shape, format specs, page size, window, layer policy,
  // k_start, seed) and every sequence (per layer: mode, K/V records of the
  // pages, the dense window) to `path`, checksummed, through a temporary file
  // and a rename: a crash never destroys an existing file.
  void save(const std::string& path) const;
  // Replaces the contents with the file's. A truncated or corrupted file, or
  // one whose config differs from this cache's, gives tq::Error naming what
  // is wrong, and the cache is left unchanged.
  void load(const std::string& path);
  // The config stored in a saved file (to build a matching cache).
  static KvCacheConfig read_config(const std::string& path);

  // ---- Events -------------------------------------------------------------
  // upgrade (one line per converted layer, automatic upgrades included), trim,
  // save, load and evict (a sliding-window layer freeing pages) each emit one
  // JSON line:
  // {"event":"upgrade","seq":S,"layer":L,"tokens":N,"bytes_before":B0,
  //  "bytes_after":B1,"ratio":R,"us":T}
  // bytes are the cache's real allocated bytes (layer-level for upgrade);
  // ratio = bf16 bytes of the same tokens / bytes_after. layer is -1 for
  // whole-cache events.
  using EventSink = std::function<void(const std::string& json_line)>;
  void set_event_sink(EventSink sink);  // empty function: events off
  static EventSink file_sink(const std::string& path);  // appends lines; throws if unwritable

  struct Impl;

 private:
  KvCacheConfig cfg_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tq
