// Internal: the storage behind KvCache, shared by kv_cache.cpp (appends,
// attention) and kv_io.cpp (saved state, events).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "turboquant/error.hpp"
#include "turboquant/kv_cache.hpp"
#include "turboquant/rng.hpp"

namespace tq {

// Tokens a channel-split layer looks at to choose each head's outlier
// channels (the first ones it compresses).
constexpr int kCalibrationTokens = 4096;

// Owns a byte buffer and keeps the cache-wide allocation counter honest.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t n, std::atomic<size_t>* counter)
      : data_(new uint8_t[n]), size_(n), counter_(counter) {
    counter_->fetch_add(n);
  }
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    release();
    data_ = std::move(o.data_);
    size_ = o.size_;
    counter_ = o.counter_;
    o.size_ = 0;
    o.counter_ = nullptr;
    return *this;
  }
  ~Buffer() { release(); }
  uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  void release() {
    if (counter_) counter_->fetch_sub(size_);
    data_.reset();
    size_ = 0;
    counter_ = nullptr;
  }
  std::unique_ptr<uint8_t[]> data_;
  size_t size_ = 0;
  std::atomic<size_t>* counter_ = nullptr;
};


struct SeqLayer {
  // Dense prefix: the sequence's first n_pre <= S tokens, [head][slot S][db]
  // for K and V. While n_pre < S the main region and the window are empty.
  Buffer pre_k, pre_v;
  int n_pre = 0;
  // Main region: pages of [K: head, slot, kb][V: head, slot, vb]. A
  // sliding-window layer frees whole pages from the front: main tokens
  // [0, n_evicted) are gone (their pages are empty Buffers; n_evicted is a
  // multiple of page_tokens), and so is the prefix once pre_evicted.
  std::vector<Buffer> pages;
  int n_main = 0;
  int n_evicted = 0;
  bool pre_evicted = false;
  bool compressed = false;
  // Dense window, a ring of W slots per head: [head][slot][db] for K and V.
  Buffer win_k, win_v;
  int win_start = 0, win_count = 0;
};

// The first position a layer still stores (0 unless it evicted).
inline int first_stored(const SeqLayer& s) {
  if (s.n_evicted > 0) return s.n_pre + s.n_evicted;
  return s.pre_evicted ? s.n_pre : 0;
}

struct Sequence {
  std::vector<SeqLayer> layers;
};

struct KvCache::Impl {
  struct LayerFormats {
    std::unique_ptr<Quantizer> kq, vq;  // compressed formats
    std::unique_ptr<Quantizer> kd, vd;  // dense format
    bool dense_policy = false;
    // Channel-split formats: per KV head, quantizers whose high-precision
    // channels are that head's outlier channels, chosen from the first tokens
    // the layer compresses (calibrate_layer). Empty for other formats and
    // until calibration; set once, before any record of the layer is
    // written, and then never changed (load() may replace them together
    // with every record).
    std::vector<std::unique_ptr<Quantizer>> kq_head, vq_head;
    std::vector<std::vector<int>> k_hi, v_hi;  // [head] the channels chosen
  };
  const KvCacheConfig& cfg;
  std::vector<LayerFormats> layers;
  // calibrated[l]: layers[l].kq_head / vq_head are set (release/acquire, so a
  // sequence that sees true sees the quantizers).
  std::unique_ptr<std::atomic<bool>[]> calibrated;
  std::mutex calib_mutex;
  mutable std::shared_mutex seq_mutex;
  std::vector<std::unique_ptr<Sequence>> seqs;  // null = removed
  std::atomic<size_t> allocated{0};

  // ---- Events (kv_io.cpp) -------------------------------------------------
  // The sink is called under sink_mutex, so one sink sees one line at a time
  // even when sequences upgrade from several threads. has_sink lets the hot
  // paths skip timing and byte counting when events are off.
  KvCache::EventSink sink;
  std::mutex sink_mutex;
  std::atomic<bool> has_sink{false};
  bool events_on() const { return has_sink.load(std::memory_order_relaxed); }
  // One JSON line: bytes are real allocated bytes; ratio = bf16 bytes of
  // `tokens` K+V tokens / bytes_after (0 when bytes_after is 0).
  void emit(const char* event, int seq, int layer, size_t tokens, size_t bytes_before,
            size_t bytes_after, double us);
  // Real bytes held by one (sequence, layer): its pages and window buffers.
  static size_t layer_bytes(const SeqLayer& s) {
    size_t n = s.win_k.size() + s.win_v.size() + s.pre_k.size() + s.pre_v.size();
    for (const Buffer& b : s.pages) n += b.size();
    return n;
  }
  // ---- end events ----------------------------------------------------------

  explicit Impl(const KvCacheConfig& c) : cfg(c) {}

  Sequence& seq(int id) const {
    std::shared_lock lk(seq_mutex);
    TQ_REQUIRE(id >= 0 && id < static_cast<int>(seqs.size()) && seqs[id], "KV cache: sequence ", id,
               " does not exist");
    return *seqs[id];
  }
  SeqLayer& sl(int seq_id, int layer) const {
    TQ_REQUIRE(layer >= 0 && layer < cfg.n_layers, "KV cache: layer ", layer, " is outside 0..",
               cfg.n_layers - 1);
    return seq(seq_id).layers[layer];
  }

  // Formats of the main region of a layer in its current mode, for one KV
  // head (channel-split formats have one quantizer per head once calibrated;
  // the record size never depends on the head).
  bool needs_calibration(int layer) const {
    return is_split(cfg.k_format_of(layer)) || is_split(cfg.v_format_of(layer));
  }
  bool is_calibrated(int layer) const { return calibrated[layer].load(std::memory_order_acquire); }
  const Quantizer& main_k(int layer, bool compressed, int head = 0) const {
    const LayerFormats& L = layers[layer];
    if (!compressed) return *L.kd;
    return is_calibrated(layer) && !L.kq_head.empty() ? *L.kq_head[head] : *L.kq;
  }
  const Quantizer& main_v(int layer, bool compressed, int head = 0) const {
    const LayerFormats& L = layers[layer];
    if (!compressed) return *L.vd;
    return is_calibrated(layer) && !L.vq_head.empty() ? *L.vq_head[head] : *L.vq;
  }
  // Per-head quantizers of a split format with the given high channels.
  std::unique_ptr<Quantizer> head_quantizer(int layer, bool key, const std::vector<int>& hi) const {
    QuantizerOptions o;
    o.seed = derive_seed(cfg.seed, uint64_t(2 * layer + (key ? 0 : 1)));
    o.hi_channels = hi;
    return make_quantizer(key ? cfg.k_format_of(layer) : cfg.v_format_of(layer), cfg.head_dim, o);
  }
  // Chooses each head's outlier channels from sample tokens (the first the
  // layer compresses) and builds its quantizers; once per layer, a no-op
  // for formats without a channel split. k, v: [n, n_heads_kv, head_dim]
  void calibrate_layer(int layer, const float* k, const float* v, int n) {
    if (!needs_calibration(layer) || is_calibrated(layer) || n <= 0) return;
    std::lock_guard lk(calib_mutex);
    if (is_calibrated(layer)) return;
    const int H = cfg.n_heads_kv, d = cfg.head_dim;
    LayerFormats& L = layers[layer];
    std::vector<float> xs(size_t(n) * d);
    for (int key = 1; key >= 0; --key) {
      const FormatSpec& f = key ? cfg.k_format_of(layer) : cfg.v_format_of(layer);
      if (!is_split(f)) continue;
      const int count = channel_split(f, d).hi_channels;
      auto& qs = key ? L.kq_head : L.vq_head;
      auto& his = key ? L.k_hi : L.v_hi;
      qs.clear();
      his.clear();
      for (int h = 0; h < H; ++h) {
        const float* src = key ? k : v;
        for (int t = 0; t < n; ++t)
          std::memcpy(&xs[size_t(t) * d], src + (size_t(t) * H + h) * d, sizeof(float) * d);
        his.push_back(select_outlier_channels(xs.data(), size_t(n), d, count));
        qs.push_back(head_quantizer(layer, key, his.back()));
      }
    }
    calibrated[layer].store(true, std::memory_order_release);
  }
  size_t page_bytes(size_t kb, size_t vb) const {
    return size_t(cfg.page_tokens) * cfg.n_heads_kv * (kb + vb);
  }
  // K record of (head, token) in the main region.
  uint8_t* k_rec(const SeqLayer& s, size_t kb, int head, int token) const {
    const int P = cfg.page_tokens;
    return s.pages[token / P].data() + (size_t(head) * P + token % P) * kb;
  }
  uint8_t* v_rec(const SeqLayer& s, size_t kb, size_t vb, int head, int token) const {
    const int P = cfg.page_tokens;
    return s.pages[token / P].data() + size_t(P) * cfg.n_heads_kv * kb +
           (size_t(head) * P + token % P) * vb;
  }
  size_t db() const { return layers[0].kd->bytes_per_vector(); }
  int window_of(int layer) const { return cfg.sliding_window.empty() ? 0 : cfg.sliding_window[layer]; }

  // Frees what no later query of a sliding-window layer can see: a query at
  // a position >= n_before (the layer's length before the append that just
  // happened) sees positions >= n_before - W + 1, so the dense prefix and
  // every whole page before that go. Emits an "evict" event when it freed
  // something and events are on.
  void evict(SeqLayer& s, int seq_id, int layer, int n_before) {
    const int W = window_of(layer), P = cfg.page_tokens;
    if (W <= 0) return;
    const int keep_from = n_before - W + 1;  // first position a later query can see
    const bool drop_pre = !s.pre_evicted && s.n_pre > 0 && s.n_pre == cfg.dense_prefix && s.n_pre <= keep_from;
    int drop_main = 0;
    while (s.n_evicted + drop_main + P <= s.n_main && s.n_pre + s.n_evicted + drop_main + P <= keep_from &&
           (s.pre_evicted || drop_pre || s.n_pre == 0))
      drop_main += P;
    if (!drop_pre && drop_main == 0) return;
    const bool ev = events_on();
    const auto t_start = ev ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    const size_t bytes_before = ev ? layer_bytes(s) : 0;
    if (drop_pre) {
      s.pre_k = Buffer();
      s.pre_v = Buffer();
      s.pre_evicted = true;
    }
    for (int t = s.n_evicted; t < s.n_evicted + drop_main; t += P) s.pages[t / P] = Buffer();
    s.n_evicted += drop_main;
    if (ev)
      emit("evict", seq_id, layer, size_t(s.n_pre + s.n_main + s.win_count - tq::first_stored(s)), bytes_before,
           layer_bytes(s),
           std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t_start).count());
  }
  uint8_t* pre_rec(const Buffer& b, int head, int idx) const {
    return b.data() + (size_t(head) * cfg.dense_prefix + idx) * db();
  }
  uint8_t* win_rec(const Buffer& b, int head, int idx) const {
    const int W = cfg.dense_window;
    return b.data() + (size_t(head) * W + idx % W) * db();
  }

  // Writes already-encoded records of tokens [n_main, n_main + n) into pages.
  // krec/vrec: [n, heads, kb/vb]
  void commit_main(SeqLayer& s, int layer, const uint8_t* krec, const uint8_t* vrec, int n) {
    const Quantizer& kq = main_k(layer, s.compressed);
    const Quantizer& vq = main_v(layer, s.compressed);
    const size_t kb = kq.bytes_per_vector(), vb = vq.bytes_per_vector();
    const int H = cfg.n_heads_kv, P = cfg.page_tokens;
    const int need_pages = (s.n_main + n + P - 1) / P;
    while (static_cast<int>(s.pages.size()) < need_pages)
      s.pages.emplace_back(page_bytes(kb, vb), &allocated);
    for (int t = 0; t < n; ++t)
      for (int h = 0; h < H; ++h) {
        std::memcpy(k_rec(s, kb, h, s.n_main + t), krec + (size_t(t) * H + h) * kb, kb);
        std::memcpy(v_rec(s, kb, vb, h, s.n_main + t), vrec + (size_t(t) * H + h) * vb, vb);
      }
    s.n_main += n;
  }

  // Converts the main region of one layer to the compressed format; emits an
  // "upgrade" event for (seq_id, layer) when events are on.
  void upgrade_layer(SeqLayer& s, int seq_id, int layer) {
    if (s.compressed || layers[layer].dense_policy) return;
    const bool ev = events_on();  // events: timing and real bytes before/after
    const auto t_start = ev ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    const size_t bytes_before = ev ? layer_bytes(s) : 0;
    const Quantizer& kd = *layers[layer].kd;
    const Quantizer& vd = *layers[layer].vd;
    const int H = cfg.n_heads_kv, d = cfg.head_dim, e = s.n_evicted, n = s.n_main - e;
    const size_t dkb = kd.bytes_per_vector();
    // Main tokens e .. n_main-1 (a sliding window may have freed those before e).
    if (needs_calibration(layer) && !is_calibrated(layer) && n > 0) {
      const int nc = std::min(n, kCalibrationTokens);
      std::vector<float> ks(size_t(nc) * H * d), vs(size_t(nc) * H * d);
      for (int t = 0; t < nc; ++t)
        for (int h = 0; h < H; ++h) {
          kd.decode_one(k_rec(s, dkb, h, e + t), &ks[(size_t(t) * H + h) * d]);
          vd.decode_one(v_rec(s, dkb, vd.bytes_per_vector(), h, e + t), &vs[(size_t(t) * H + h) * d]);
        }
      calibrate_layer(layer, ks.data(), vs.data(), nc);
    }
    const size_t kb = main_k(layer, true).bytes_per_vector(), vb = main_v(layer, true).bytes_per_vector();
    std::vector<uint8_t> krec(size_t(n) * H * kb), vrec(size_t(n) * H * vb);
    std::vector<float> x(d);
    for (int t = 0; t < n; ++t)
      for (int h = 0; h < H; ++h) {
        const Quantizer& kq = main_k(layer, true, h);
        const Quantizer& vq = main_v(layer, true, h);
        kd.decode_one(k_rec(s, dkb, h, e + t), x.data());
        kq.encode_one(x.data(), &krec[(size_t(t) * H + h) * kb]);
        vd.decode_one(v_rec(s, dkb, vd.bytes_per_vector(), h, e + t), x.data());
        vq.encode_one(x.data(), &vrec[(size_t(t) * H + h) * vb]);
      }
    // Nothing has changed so far; now swap in the compressed pages (the
    // evicted ones stay empty).
    s.pages.clear();
    s.pages.resize(size_t(e / cfg.page_tokens));
    s.n_main = e;
    s.compressed = true;
    commit_main(s, layer, krec.data(), vrec.data(), n);
    if (ev)
      emit("upgrade", seq_id, layer, size_t(s.n_pre + s.n_main + s.win_count - tq::first_stored(s)), bytes_before,
           layer_bytes(s),
           std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t_start)
               .count());
  }
};

}  // namespace tq
