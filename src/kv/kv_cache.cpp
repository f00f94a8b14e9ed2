// KvCache: pages of records per (sequence, layer), a dense recent window,
// upgrade after prefill, and decode attention over it all.
#include "turboquant/kv_cache.hpp"

#include "kv/kv_cache_impl.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <shared_mutex>

#include "turboquant/error.hpp"
#include "turboquant/parallel.hpp"
#include "turboquant/record_attention.hpp"
#include "turboquant/rng.hpp"

namespace tq {

KvCache::KvCache(KvCacheConfig config) : cfg_(std::move(config)), impl_(new Impl(cfg_)) {
  cfg_.validate();
  impl_->layers.resize(cfg_.n_layers);
  impl_->calibrated.reset(new std::atomic<bool>[cfg_.n_layers]);
  for (int l = 0; l < cfg_.n_layers; ++l) impl_->calibrated[l].store(false);
  for (int l = 0; l < cfg_.n_layers; ++l) {
    auto& L = impl_->layers[l];
    QuantizerOptions ko, vo;
    ko.seed = derive_seed(cfg_.seed, uint64_t(2 * l));
    vo.seed = derive_seed(cfg_.seed, uint64_t(2 * l + 1));
    L.kq = make_quantizer(cfg_.k_format_of(l), cfg_.head_dim, ko);
    L.vq = make_quantizer(cfg_.v_format_of(l), cfg_.head_dim, vo);
    L.kd = make_quantizer(cfg_.dense_format, cfg_.head_dim, ko);
    L.vd = make_quantizer(cfg_.dense_format, cfg_.head_dim, vo);
    L.dense_policy = std::find(cfg_.dense_layers.begin(), cfg_.dense_layers.end(), l) !=
                     cfg_.dense_layers.end();
  }
}

KvCache::~KvCache() = default;

const Quantizer& KvCache::k_quantizer(int layer, int head) const {
  TQ_REQUIRE(layer >= 0 && layer < cfg_.n_layers, "layer ", layer, " out of range");
  TQ_REQUIRE(head >= 0 && head < cfg_.n_heads_kv, "head ", head, " out of range");
  return impl_->main_k(layer, true, head);
}
const Quantizer& KvCache::v_quantizer(int layer, int head) const {
  TQ_REQUIRE(layer >= 0 && layer < cfg_.n_layers, "layer ", layer, " out of range");
  TQ_REQUIRE(head >= 0 && head < cfg_.n_heads_kv, "head ", head, " out of range");
  return impl_->main_v(layer, true, head);
}

std::vector<int> KvCache::outlier_channels(int layer, int head, bool key) const {
  TQ_REQUIRE(layer >= 0 && layer < cfg_.n_layers, "layer ", layer, " out of range");
  TQ_REQUIRE(head >= 0 && head < cfg_.n_heads_kv, "head ", head, " out of range");
  if (!impl_->is_calibrated(layer)) return {};
  const auto& his = key ? impl_->layers[layer].k_hi : impl_->layers[layer].v_hi;
  return his.empty() ? std::vector<int>{} : his[head];
}

int KvCache::sliding_window_of(int layer) const {
  TQ_REQUIRE(layer >= 0 && layer < cfg_.n_layers, "layer ", layer, " out of range");
  return impl_->window_of(layer);
}

int KvCache::add_sequence() {
  auto s = std::make_unique<Sequence>();
  s->layers.resize(cfg_.n_layers);
  for (int l = 0; l < cfg_.n_layers; ++l)
    s->layers[l].compressed = !impl_->layers[l].dense_policy && cfg_.k_start == 0;
  std::unique_lock lk(impl_->seq_mutex);
  impl_->seqs.push_back(std::move(s));
  return static_cast<int>(impl_->seqs.size()) - 1;
}

void KvCache::remove_sequence(int seq) {
  impl_->seq(seq);  // validates
  std::unique_lock lk(impl_->seq_mutex);
  impl_->seqs[seq].reset();
}

std::vector<int> KvCache::sequences() const {
  std::shared_lock lk(impl_->seq_mutex);
  std::vector<int> out;
  for (size_t i = 0; i < impl_->seqs.size(); ++i)
    if (impl_->seqs[i]) out.push_back(static_cast<int>(i));
  return out;
}

int KvCache::n_tokens(int seq, int layer) const {
  const SeqLayer& s = impl_->sl(seq, layer);
  return s.n_pre + s.n_main + s.win_count;
}

int KvCache::first_stored(int seq, int layer) const { return tq::first_stored(impl_->sl(seq, layer)); }

bool KvCache::is_compressed(int seq, int layer) const { return impl_->sl(seq, layer).compressed; }

void KvCache::append(int seq, int layer, const float* k, const float* v, int n) {
  TQ_REQUIRE(n >= 0, "append: n_tokens must be >= 0, got ", n);
  if (n == 0) return;
  SeqLayer& s = impl_->sl(seq, layer);
  const int H = cfg_.n_heads_kv, d = cfg_.head_dim, W = cfg_.dense_window;
  const size_t row = size_t(H) * d;
  for (size_t i = 0; i < size_t(n) * row; ++i)
    if (!std::isfinite(k[i]) || !std::isfinite(v[i]))
      TQ_THROW("append: layer ", layer, " token ", i / row, " head ", (i % row) / d, " component ",
               i % d, ": ", std::isfinite(k[i]) ? "value" : "key", " is ",
               std::isfinite(k[i]) ? v[i] : k[i], " (NaN/Inf is refused; the cache is unchanged)");
  const Quantizer& kd = *impl_->layers[layer].kd;
  const Quantizer& vd = *impl_->layers[layer].vd;
  const size_t db = kd.bytes_per_vector();
  const int n_before = s.n_pre + s.n_main + s.win_count;

  // The sequence's first S tokens go to the dense prefix (while it is not
  // full, the main region and the window are empty); the rest as below.
  const int S = cfg_.dense_prefix;
  const int pre_take = std::min(n, S - s.n_pre);
  std::vector<uint8_t> kpre(size_t(pre_take) * H * db), vpre(size_t(pre_take) * H * db);
  for (int t = 0; t < pre_take; ++t)
    for (int h = 0; h < H; ++h) {
      const size_t src = size_t(t) * row + size_t(h) * d;
      kd.encode_one(k + src, &kpre[(size_t(t) * H + h) * db]);
      vd.encode_one(v + src, &vpre[(size_t(t) * H + h) * db]);
    }
  k += size_t(pre_take) * row;
  v += size_t(pre_take) * row;
  n -= pre_take;

  // Tokens in arrival order: the old window, then the new ones. The oldest
  // (total - W) of them go to the main pages. Everything is encoded into
  // scratch first, so a failure leaves the cache unchanged.
  const int total = s.win_count + n;
  const int to_main = std::max(0, total - W);
  const int old_to_main = std::min(to_main, s.win_count);
  std::vector<float> x(d);
  std::vector<uint8_t> dense_tmp(db);
  // A channel-split layer chooses its heads' outlier channels from the first
  // tokens it compresses: these, as they will be encoded (dense-rounded).
  if (s.compressed && to_main > 0 && impl_->needs_calibration(layer) && !impl_->is_calibrated(layer)) {
    const int nc = std::min(to_main, kCalibrationTokens);
    std::vector<float> ks(size_t(nc) * row), vs(size_t(nc) * row);
    for (int t = 0; t < nc; ++t)
      for (int h = 0; h < H; ++h) {
        float* ko = &ks[size_t(t) * row + size_t(h) * d];
        float* vo = &vs[size_t(t) * row + size_t(h) * d];
        if (t < old_to_main) {
          kd.decode_one(impl_->win_rec(s.win_k, h, s.win_start + t), ko);
          vd.decode_one(impl_->win_rec(s.win_v, h, s.win_start + t), vo);
        } else {
          const size_t src = size_t(t - old_to_main) * row + size_t(h) * d;
          kd.encode_one(k + src, dense_tmp.data());
          kd.decode_one(dense_tmp.data(), ko);
          vd.encode_one(v + src, dense_tmp.data());
          vd.decode_one(dense_tmp.data(), vo);
        }
      }
    impl_->calibrate_layer(layer, ks.data(), vs.data(), nc);
  }
  const size_t kb = impl_->main_k(layer, s.compressed).bytes_per_vector();
  const size_t vb = impl_->main_v(layer, s.compressed).bytes_per_vector();
  std::vector<uint8_t> krec(size_t(to_main) * H * kb), vrec(size_t(to_main) * H * vb);
  for (int t = 0; t < to_main; ++t)
    for (int h = 0; h < H; ++h) {
      const Quantizer& kq = impl_->main_k(layer, s.compressed, h);
      const Quantizer& vq = impl_->main_v(layer, s.compressed, h);
      const float *kx, *vx;
      if (t < old_to_main) {  // ages out of the window: decode the dense record
        kd.decode_one(impl_->win_rec(s.win_k, h, s.win_start + t), x.data());
        kq.encode_one(x.data(), &krec[(size_t(t) * H + h) * kb]);
        vd.decode_one(impl_->win_rec(s.win_v, h, s.win_start + t), x.data());
        vq.encode_one(x.data(), &vrec[(size_t(t) * H + h) * vb]);
        continue;
      }
      kx = k + size_t(t - old_to_main) * row + size_t(h) * d;
      vx = v + size_t(t - old_to_main) * row + size_t(h) * d;
      // Compressed records are always encoded from the token's dense-format
      // value, whether it arrives directly, ages out of the window or is
      // upgraded later: the bytes do not depend on the path (trim + append
      // equals a fresh build).
      kd.encode_one(kx, dense_tmp.data());
      kd.decode_one(dense_tmp.data(), x.data());
      kq.encode_one(x.data(), &krec[(size_t(t) * H + h) * kb]);
      vd.encode_one(vx, dense_tmp.data());
      vd.decode_one(dense_tmp.data(), x.data());
      vq.encode_one(x.data(), &vrec[(size_t(t) * H + h) * vb]);
    }
  // New tokens that stay in the window, encoded densely.
  const int new_to_win = n - (to_main - old_to_main);
  std::vector<uint8_t> kwin(size_t(new_to_win) * H * db), vwin(size_t(new_to_win) * H * db);
  for (int t = 0; t < new_to_win; ++t)
    for (int h = 0; h < H; ++h) {
      const size_t src = size_t(n - new_to_win + t) * row + size_t(h) * d;
      kd.encode_one(k + src, &kwin[(size_t(t) * H + h) * db]);
      vd.encode_one(v + src, &vwin[(size_t(t) * H + h) * db]);
    }

  // Commit.
  if (pre_take > 0 && !s.pre_k.data()) {
    s.pre_k = Buffer(size_t(S) * H * db, &impl_->allocated);
    s.pre_v = Buffer(size_t(S) * H * db, &impl_->allocated);
  }
  for (int t = 0; t < pre_take; ++t) {
    for (int h = 0; h < H; ++h) {
      std::memcpy(impl_->pre_rec(s.pre_k, h, s.n_pre), &kpre[(size_t(t) * H + h) * db], db);
      std::memcpy(impl_->pre_rec(s.pre_v, h, s.n_pre), &vpre[(size_t(t) * H + h) * db], db);
    }
    ++s.n_pre;
  }
  impl_->commit_main(s, layer, krec.data(), vrec.data(), to_main);
  s.win_start += old_to_main;
  s.win_count -= old_to_main;
  if (new_to_win > 0 && !s.win_k.data()) {
    s.win_k = Buffer(size_t(W) * H * db, &impl_->allocated);
    s.win_v = Buffer(size_t(W) * H * db, &impl_->allocated);
  }
  for (int t = 0; t < new_to_win; ++t) {
    for (int h = 0; h < H; ++h) {
      std::memcpy(impl_->win_rec(s.win_k, h, s.win_start + s.win_count), &kwin[(size_t(t) * H + h) * db], db);
      std::memcpy(impl_->win_rec(s.win_v, h, s.win_start + s.win_count), &vwin[(size_t(t) * H + h) * db], db);
    }
    ++s.win_count;
  }
  if (W > 0) s.win_start %= W;
  impl_->evict(s, seq, layer, n_before);  // sliding-window layers only
  if (cfg_.k_start > 0 && !s.compressed && s.n_pre + s.n_main + s.win_count >= cfg_.k_start)
    impl_->upgrade_layer(s, seq, layer);  // emits an "upgrade" event when events are on
}

void KvCache::trim(int seq, int n_tokens) {
  TQ_REQUIRE(n_tokens >= 0, "trim: n_tokens must be >= 0, got ", n_tokens);
  Sequence& sq = impl_->seq(seq);
  // Events: real bytes of the whole sequence before/after (layer -1).
  const bool ev = impl_->events_on();
  const auto t_start = ev ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  size_t bytes_before = 0;
  if (ev)
    for (const SeqLayer& s : sq.layers) bytes_before += Impl::layer_bytes(s);
  // A layer that evicted cannot go back to where a query would need what it
  // freed (checked for every layer before any changes).
  for (int l = 0; l < cfg_.n_layers && n_tokens > 0; ++l) {
    const SeqLayer& s = sq.layers[l];
    const int first = tq::first_stored(s), W = impl_->window_of(l);
    if (first > 0 && n_tokens < s.n_pre + s.n_main + s.win_count && n_tokens < first + W - 1)
      TQ_THROW("trim: sequence ", seq, " layer ", l, " (sliding window ", W, ") has freed positions [0, ",
               first, "); trimming to ", n_tokens, " tokens would need them for the next query (",
               "the shortest length it can go back to is ", first + W - 1,
               ", or 0 to start over; nothing was trimmed)");
  }
  for (int l = 0; l < cfg_.n_layers; ++l) {
    SeqLayer& s = sq.layers[l];
    if (n_tokens >= s.n_pre + s.n_main + s.win_count) continue;
    if (n_tokens == 0) {  // start over: evicted positions included
      s.n_evicted = 0;
      s.pre_evicted = false;
    }
    if (n_tokens >= s.n_pre + s.n_main) {
      s.win_count = n_tokens - s.n_pre - s.n_main;
    } else if (n_tokens >= s.n_pre) {
      s.n_main = n_tokens - s.n_pre;
      s.win_count = 0;
      s.pages.resize((s.n_main + cfg_.page_tokens - 1) / cfg_.page_tokens);
    } else {  // into the prefix: what follows it goes
      s.n_pre = n_tokens;
      s.n_main = 0;
      s.win_count = 0;
      s.pages.clear();
    }
    if (s.n_main + s.win_count == 0) {
      s.pages.clear();
      s.win_k = Buffer();
      s.win_v = Buffer();
      s.win_start = 0;
    }
    if (s.n_pre == 0) {
      s.pre_k = Buffer();
      s.pre_v = Buffer();
    }
  }
  if (ev) {
    size_t bytes_after = 0, tokens = 0;
    for (const SeqLayer& s : sq.layers) {
      bytes_after += Impl::layer_bytes(s);
      tokens += size_t(s.n_pre) + s.n_main + s.win_count;
    }
    impl_->emit("trim", seq, -1, tokens, bytes_before, bytes_after,
                std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t_start)
                    .count());
  }
}

void KvCache::clear() {
  for (int id : sequences()) trim(id, 0);
}

int KvCache::upgrade(int k_start) {
  TQ_REQUIRE(k_start >= 0, "upgrade: k_start must be >= 0, got ", k_start);
  int converted = 0;
  for (int id : sequences()) {
    Sequence& sq = impl_->seq(id);
    for (int l = 0; l < cfg_.n_layers; ++l) {
      SeqLayer& s = sq.layers[l];
      if (s.compressed || impl_->layers[l].dense_policy) continue;
      if (s.n_pre + s.n_main + s.win_count < k_start) continue;
      impl_->upgrade_layer(s, id, l);  // emits an "upgrade" event when events are on
      ++converted;
    }
  }
  return converted;
}

void KvCache::attend(int seq, int layer, const float* q, int n_heads_q,
                     const AttentionParams& params, float* out, float* lse_out, int q_pos,
                     int threads) const {
  const SeqLayer& s = impl_->sl(seq, layer);
  const int H = cfg_.n_heads_kv, d = cfg_.head_dim, P = cfg_.page_tokens;
  TQ_REQUIRE(n_heads_q >= H && n_heads_q % H == 0, "attend: n_heads_q ", n_heads_q,
             " must be a multiple of n_heads_kv ", H);
  const int g = n_heads_q / H;
  const int total = s.n_pre + s.n_main + s.win_count;
  if (q_pos < 0) q_pos = total - 1;
  const Quantizer& kd = *impl_->layers[layer].kd;
  const Quantizer& vd = *impl_->layers[layer].vd;
  const size_t kb = impl_->main_k(layer, s.compressed).bytes_per_vector();
  const size_t vb = impl_->main_v(layer, s.compressed).bytes_per_vector();
  const size_t db = kd.bytes_per_vector();
  const int first = tq::first_stored(s);
  if (first > 0) {
    // What this query may see must still be stored: never answer from less.
    const int need = params.n_sinks > 0 || params.window <= 0 ? 0 : q_pos - params.window + 1;
    TQ_REQUIRE(need >= first, "attend: sequence ", seq, " layer ", layer, " freed positions [0, ", first,
               ") (sliding window ", impl_->window_of(layer), "), but a query at position ", q_pos,
               " with window ", params.window, " and ", params.n_sinks, " sinks needs position ",
               std::max(need, 0));
  }

  // Split-KV: each task is (kv head, range of pages); the window and the
  // prefix are one more part each per head. Parts are merged with
  // merge_states. Main token i sits at position n_pre + i; pages before
  // n_evicted / P were freed by a sliding window.
  const int page0 = s.n_evicted / P;
  const int n_pages = (s.n_main + P - 1) / P - page0;
  const int want_tasks = std::max(1, threads <= 0 ? hardware_threads() : threads) * 2;
  const int splits = std::max(1, std::min(n_pages, (want_tasks + H - 1) / H));
  // + window, + prefix only when it holds tokens (no empty task on the hot path)
  const int parts = splits + 1 + (s.n_pre > 0 && !s.pre_evicted ? 1 : 0);
  const int pos0 = s.n_pre;
  std::vector<float> part_out(size_t(H) * parts * g * d);
  std::vector<float> part_lse(size_t(H) * parts * g, kEmptyLse);

  parallel_for(size_t(H) * parts, threads, [&](size_t task) {
    const int h = static_cast<int>(task / parts), part = static_cast<int>(task % parts);
    float* po = &part_out[(size_t(h) * parts + part) * g * d];
    float* pl = &part_lse[(size_t(h) * parts + part) * g];
    const float* qh = q + size_t(h) * g * d;  // query heads h*g .. h*g+g-1 share KV head h
    if (part < splits) {
      const int p0 = int(int64_t(n_pages) * part / splits), p1 = int(int64_t(n_pages) * (part + 1) / splits);
      if (p0 == p1) {
        std::fill(po, po + size_t(g) * d, 0.0f);
        return;
      }
      const Quantizer& kq = impl_->main_k(layer, s.compressed, h);
      const Quantizer& vq = impl_->main_v(layer, s.compressed, h);
      std::vector<float> qp(size_t(g) * kq.query_floats());
      kq.prepare_queries(qh, g, qp.data());
      OnlineSoftmax st(g, vq.acc_floats());
      for (int pg = page0 + p0; pg < page0 + p1; ++pg) {
        const int t0 = pg * P, n = std::min(P, s.n_main - t0);
        attend_records(kq, vq, qp.data(), g, impl_->k_rec(s, kb, h, t0), kb,
                       impl_->v_rec(s, kb, vb, h, t0), vb, n, pos0 + t0, q_pos, params, st);
      }
      st.finish(vq, po, pl);
    } else if (part == splits + 1) {  // the dense prefix
      std::vector<float> qp(size_t(g) * kd.query_floats());
      kd.prepare_queries(qh, g, qp.data());
      OnlineSoftmax st(g, vd.acc_floats());
      attend_records(kd, vd, qp.data(), g, impl_->pre_rec(s.pre_k, h, 0), db,
                     impl_->pre_rec(s.pre_v, h, 0), db, s.n_pre, 0, q_pos, params, st);
      st.finish(vd, po, pl);
    } else {
      std::vector<float> qp(size_t(g) * kd.query_floats());
      kd.prepare_queries(qh, g, qp.data());
      OnlineSoftmax st(g, vd.acc_floats());
      // The ring holds tokens n_main .. total-1 in at most two contiguous runs.
      const int W = cfg_.dense_window;
      int done = 0;
      while (done < s.win_count) {
        const int idx = (s.win_start + done) % W;
        const int run = std::min(s.win_count - done, W - idx);
        attend_records(kd, vd, qp.data(), g, impl_->win_rec(s.win_k, h, idx), db,
                       impl_->win_rec(s.win_v, h, idx), db, run, pos0 + s.n_main + done, q_pos, params, st);
        done += run;
      }
      st.finish(vd, po, pl);
    }
  });

  for (int h = 0; h < H; ++h)
    for (int j = 0; j < g; ++j) {
      float* o = out + (size_t(h) * g + j) * d;
      float lse = kEmptyLse;
      std::fill(o, o + d, 0.0f);
      for (int part = 0; part < parts; ++part) {
        const size_t idx = (size_t(h) * parts + part) * g + j;
        merge_states(o, lse, &part_out[idx * d], part_lse[idx], o, &lse, d);
      }
      if (lse_out) lse_out[h * g + j] = lse;
    }
}

void KvCache::attend_prefill(int seq, int layer, const float* q, int n_q, int n_heads_q, int pos0,
                             const AttentionParams& params, float* out, int threads) const {
  const size_t row = size_t(n_heads_q) * cfg_.head_dim;
  for (int t = 0; t < n_q; ++t)
    attend(seq, layer, q + t * row, n_heads_q, params, out + t * row, nullptr, pos0 + t, threads);
}

void KvCache::dequantize(int seq, int layer, float* k, float* v) const {
  const SeqLayer& s = impl_->sl(seq, layer);
  const int H = cfg_.n_heads_kv, d = cfg_.head_dim;
  const Quantizer& kd = *impl_->layers[layer].kd;
  const Quantizer& vd = *impl_->layers[layer].vd;
  const size_t kb = impl_->main_k(layer, s.compressed).bytes_per_vector();
  const size_t vb = impl_->main_v(layer, s.compressed).bytes_per_vector();
  TQ_REQUIRE(tq::first_stored(s) == 0, "dequantize: sequence ", seq, " layer ", layer,
             " freed positions [0, ", tq::first_stored(s), ") (sliding window ", impl_->window_of(layer),
             "); there is nothing to decode there");
  for (int t = 0; t < s.n_pre + s.n_main + s.win_count; ++t)
    for (int h = 0; h < H; ++h) {
      const Quantizer& kq = impl_->main_k(layer, s.compressed, h);
      const Quantizer& vq = impl_->main_v(layer, s.compressed, h);
      float* ko = k + (size_t(t) * H + h) * d;
      float* vo = v + (size_t(t) * H + h) * d;
      const int i = t - s.n_pre;  // main index
      if (i < 0) {
        kd.decode_one(impl_->pre_rec(s.pre_k, h, t), ko);
        vd.decode_one(impl_->pre_rec(s.pre_v, h, t), vo);
      } else if (i < s.n_main) {
        kq.decode_one(impl_->k_rec(s, kb, h, i), ko);
        vq.decode_one(impl_->v_rec(s, kb, vb, h, i), vo);
      } else {
        const int idx = s.win_start + (i - s.n_main);
        kd.decode_one(impl_->win_rec(s.win_k, h, idx), ko);
        vd.decode_one(impl_->win_rec(s.win_v, h, idx), vo);
      }
    }
}

void KvCache::read_records(int seq, int layer, int t0, int n, uint8_t* k, uint8_t* v) const {
  const SeqLayer& s = impl_->sl(seq, layer);
  TQ_REQUIRE(s.compressed, "read_records: layer ", layer, " of sequence ", seq,
             " is dense (not upgraded yet): it holds no compressed records");
  TQ_REQUIRE(t0 >= s.n_pre + s.n_evicted && n >= 0 && int64_t(t0) + n <= int64_t(s.n_pre) + s.n_main,
             "read_records: tokens [", t0, ", ", int64_t(t0) + n, ") of layer ", layer, " of sequence ",
             seq, ", whose stored compressed tokens are [", s.n_pre + s.n_evicted, ", ", s.n_pre + s.n_main,
             ")", s.n_evicted > 0 ? " (a sliding window freed the ones before)" : "");
  t0 -= s.n_pre;  // main index
  if (n > 0) TQ_REQUIRE(k != nullptr && v != nullptr, "read_records: null output buffer");
  const int H = cfg_.n_heads_kv;
  const size_t kb = impl_->main_k(layer, true).bytes_per_vector();
  const size_t vb = impl_->main_v(layer, true).bytes_per_vector();
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < H; ++h) {
      std::memcpy(k + (size_t(t) * H + h) * kb, impl_->k_rec(s, kb, h, t0 + t), kb);
      std::memcpy(v + (size_t(t) * H + h) * vb, impl_->v_rec(s, kb, vb, h, t0 + t), vb);
    }
}

void KvCache::append_records(int seq, int layer, const uint8_t* k, const uint8_t* v, int n) {
  SeqLayer& s = impl_->sl(seq, layer);
  TQ_REQUIRE(n >= 0, "append_records: n must be >= 0, got ", n);
  if (n == 0) return;
  TQ_REQUIRE(k != nullptr && v != nullptr, "append_records: null input buffer");
  TQ_REQUIRE(s.compressed, "append_records: layer ", layer, " of sequence ", seq,
             " is dense (kept dense by policy, or waiting for k_start); records need a compressed layer");
  TQ_REQUIRE(cfg_.dense_window == 0, "append_records: needs dense_window 0 (got ", cfg_.dense_window,
             "): the newest tokens of a windowed cache are dense, not records");
  TQ_REQUIRE(s.n_pre == cfg_.dense_prefix, "append_records: the dense prefix holds ", s.n_pre, " of ",
             cfg_.dense_prefix, " tokens; the first tokens of a sequence are dense, not records");
  TQ_REQUIRE(!impl_->needs_calibration(layer), "append_records: the formats ",
             to_string(cfg_.k_format_of(layer)), " / ", to_string(cfg_.v_format_of(layer)),
             " choose outlier channels per head; their records cannot be moved on their own");
  const int H = cfg_.n_heads_kv, d = cfg_.head_dim;
  const Quantizer& kq = impl_->main_k(layer, true);
  const Quantizer& vq = impl_->main_v(layer, true);
  const size_t kb = kq.bytes_per_vector(), vb = vq.bytes_per_vector();
  std::vector<float> x(d);
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < H; ++h)
      for (int key = 1; key >= 0; --key) {
        (key ? kq : vq).decode_one((key ? k : v) + (size_t(t) * H + h) * (key ? kb : vb), x.data());
        for (int i = 0; i < d; ++i)
          TQ_REQUIRE(std::isfinite(x[i]), "append_records: the ", key ? "K" : "V", " record of token ",
                     t, " head ", h, " decodes to ", x[i], " at component ", i,
                     " (refused; the cache is unchanged)");
      }
  const int n_before = s.n_pre + s.n_main + s.win_count;
  impl_->commit_main(s, layer, k, v, n);
  impl_->evict(s, seq, layer, n_before);
}

KvMemoryReport KvCache::memory() const {
  KvMemoryReport r;
  const int H = cfg_.n_heads_kv, P = cfg_.page_tokens, d = cfg_.head_dim;
  std::shared_lock lk(impl_->seq_mutex);
  for (const auto& sq : impl_->seqs) {
    if (!sq) continue;
    for (int l = 0; l < cfg_.n_layers; ++l) {
      const SeqLayer& s = sq->layers[l];
      const size_t first = size_t(tq::first_stored(s));
      const size_t tokens = size_t(s.n_pre) + s.n_main + s.win_count - first;
      r.tokens += tokens;
      r.evicted += first;
      r.dense_equivalent += tokens * H * d * 2 * 2;  // bf16 K + V
      auto add = [&](KvMemory& m, size_t slots) {
        if (s.compressed) {
          for (const FormatSpec* f : {&cfg_.k_format_of(l), &cfg_.v_format_of(l)}) {
            const RecordBytes rb = record_bytes(*f, d);
            m.codes += slots * H * rb.codes;
            m.scales += slots * H * rb.scales;
            m.sketch += slots * H * rb.sketch;
          }
        } else {
          m.dense += slots * H * 2 * bytes_per_vector(cfg_.dense_format, d);
        }
      };
      add(r.allocated, (s.pages.size() - size_t(s.n_evicted / P)) * size_t(P));
      add(r.used, size_t(s.n_main - s.n_evicted));
      const size_t db = bytes_per_vector(cfg_.dense_format, d);
      if (s.win_k.data()) r.allocated.dense += size_t(cfg_.dense_window) * H * db * 2;
      r.used.dense += size_t(s.win_count) * H * db * 2;
      if (s.pre_k.data()) r.allocated.dense += size_t(cfg_.dense_prefix) * H * db * 2;
      if (!s.pre_evicted) r.used.dense += size_t(s.n_pre) * H * db * 2;
    }
  }
  return r;
}

size_t KvCache::bytes_allocated() const { return impl_->allocated.load(); }

}  // namespace tq
