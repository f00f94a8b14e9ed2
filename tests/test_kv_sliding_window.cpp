// Sliding-window layers (KvCacheConfig::sliding_window): the cache frees the
// pages and the dense prefix that no later query can see. Checked here:
// attention through the window is the same as on a cache that keeps every
// token (for every query of every appended chunk, across page boundaries, with
// a dense window and prefix, after an upgrade); memory stays bounded and the
// report equals what is allocated; trims that would need freed positions,
// queries that would, dequantize and read_records of freed tokens are
// refused with an error naming the limit, and change nothing; events.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "turboquant/error.hpp"
#include "turboquant/kv_cache.hpp"

namespace tq {
namespace {

using test::kv_data;
using test::norm_err;

// Two caches of one config, one with layer 0 as a sliding-window layer of W
// positions (layer 1 keeps every token in both); appends of the given chunk
// sizes; after each append, every query of the chunk attends both.
struct Case {
  const char* preset;
  int page, window, dense_window, dense_prefix, k_start;
  std::vector<int> chunks;
};

TEST(KvSlidingWindow, AttentionThroughTheWindowIsUnchangedByEviction) {
  const Case cases[] = {
      {"turbo3", 8, 13, 0, 0, 0, {1, 1, 5, 9, 1, 16, 3, 1, 1, 1, 40, 1, 1, 7}},
      {"paper_mse", 16, 16, 4, 2, 0, {20, 1, 1, 1, 33, 1, 15, 16, 17, 1, 1}},
      {"paper_prod", 4, 5, 3, 1, 0, {2, 2, 2, 2, 2, 9, 1, 1, 1, 1, 1, 12, 3}},
      {"turbo4-out", 8, 24, 0, 4, 0, {40, 40, 1, 1, 1, 30}},
      {"q4_0", 32, 64, 8, 0, 0, {100, 1, 1, 1, 50, 1}},
      {"dense-f16", 8, 10, 0, 0, 0, {3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3}},
      // Upgrade after eviction: layers stay dense until 40 positions, by which
      // time pages were freed.
      {"turbo3", 8, 9, 0, 2, 40, {10, 10, 10, 10, 10, 1, 1, 1}},
      {"paper_mse", 8, 9, 2, 0, 30, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                      1, 1, 1, 1, 1, 1, 1, 1, 20}},
      // (A channel-split format upgraded after eviction chooses its outlier
      // channels from the tokens still stored, so its records differ from a
      // full cache's; with k_start 0, as here, it chooses before any eviction.)
  };
  const int H = 2, d = 64, hq = 4;
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.preset) + " page " + std::to_string(c.page) + " window " +
                 std::to_string(c.window) + " dense window " + std::to_string(c.dense_window) + " prefix " +
                 std::to_string(c.dense_prefix) + " k_start " + std::to_string(c.k_start));
    KvCacheConfig full = KvCacheConfig::from_preset(c.preset, 2, H, d);
    full.page_tokens = c.page;
    full.dense_window = c.dense_window;
    full.dense_prefix = c.dense_prefix;
    full.k_start = c.k_start;
    KvCacheConfig swa = full;
    swa.sliding_window = {c.window, 0};
    KvCache a(swa), b(full);
    const int sa = a.add_sequence(), sb = b.add_sequence();
    int n = 0;
    for (int m : c.chunks) n += m;
    const auto k = kv_data(size_t(n), H, d, 11), v = kv_data(size_t(n), H, d, 12);
    const auto q = test::random_gaussian(size_t(hq) * d, 13);
    AttentionParams p;
    p.window = c.window;
    int pos = 0;
    bool evicted = false;
    for (int m : c.chunks) {
      for (int l = 0; l < 2; ++l) {
        a.append(sa, l, k.data() + size_t(pos) * H * d, v.data() + size_t(pos) * H * d, m);
        b.append(sb, l, k.data() + size_t(pos) * H * d, v.data() + size_t(pos) * H * d, m);
      }
      ASSERT_EQ(a.n_tokens(sa, 0), pos + m);
      ASSERT_EQ(a.first_stored(sa, 1), 0);
      // What a later query (position >= pos) can see is still stored.
      ASSERT_LE(a.first_stored(sa, 0), std::max(0, pos - c.window + 1));
      evicted = evicted || a.first_stored(sa, 0) > 0;
      for (int t = pos; t < pos + m; ++t) {
        std::vector<float> oa(size_t(hq) * d), ob(oa.size());
        float la[hq], lb[hq];
        a.attend(sa, 0, q.data(), hq, p, oa.data(), la, t);
        b.attend(sb, 0, q.data(), hq, p, ob.data(), lb, t);
        ASSERT_LE(norm_err(oa.data(), ob.data(), oa.size()), 1e-6) << "query at " << t;
        for (int h = 0; h < hq; ++h) ASSERT_NEAR(la[h], lb[h], 1e-5) << "query at " << t;
      }
      pos += m;
    }
    EXPECT_TRUE(evicted);
    // The freed positions no longer count as stored; the rest do.
    const KvMemoryReport ra = a.memory(), rb = b.memory();
    EXPECT_EQ(ra.evicted, size_t(a.first_stored(sa, 0)));
    EXPECT_EQ(ra.tokens + ra.evicted, rb.tokens);
    EXPECT_EQ(ra.allocated.total(), a.bytes_allocated());
    EXPECT_LT(a.bytes_allocated(), b.bytes_allocated());
  }
}

TEST(KvSlidingWindow, MemoryStaysBoundedAndTheReportIsExact) {
  // 1,000 decode steps through a window of 20 with pages of 16: the layer
  // never holds more than window + page + the dense ring's worth of tokens.
  for (const char* preset : {"paper_mse", "dense-f16", "turbo2.5"}) {
    SCOPED_TRACE(preset);
    KvCacheConfig cfg = KvCacheConfig::from_preset(preset, 1, 2, 128);
    cfg.page_tokens = 16;
    cfg.dense_window = 4;
    cfg.dense_prefix = 2;
    cfg.sliding_window = {20};
    KvCache cache(cfg);
    const int s = cache.add_sequence();
    const auto k = kv_data(1000, 2, 128, 3), v = kv_data(1000, 2, 128, 4);
    size_t peak = 0;
    for (int t = 0; t < 1000; ++t) {
      cache.append(s, 0, k.data() + size_t(t) * 256, v.data() + size_t(t) * 256, 1);
      const KvMemoryReport r = cache.memory();
      ASSERT_EQ(r.allocated.total(), cache.bytes_allocated()) << t;
      ASSERT_EQ(r.tokens + r.evicted, size_t(t + 1)) << t;
      ASSERT_LE(r.tokens, size_t(20 + 16 + 4)) << t;
      peak = std::max(peak, cache.bytes_allocated());
    }
    // At most 3 pages (a window of 20 spans 2 or 3 of 16) and the ring.
    KvCacheConfig one = cfg;
    one.sliding_window.clear();
    one.dense_prefix = 0;
    KvCache ref(one);
    const int r = ref.add_sequence();
    ref.append(r, 0, k.data(), v.data(), 3 * 16 + 4);
    EXPECT_LE(peak, ref.bytes_allocated());
    EXPECT_GT(cache.memory().evicted, 900u);
  }
}

TEST(KvSlidingWindow, RefusalsNameTheLimitAndChangeNothing) {
  KvCacheConfig cfg = KvCacheConfig::from_preset("turbo3", 2, 1, 64);
  cfg.page_tokens = 8;
  cfg.sliding_window = {10, 0};
  KvCache cache(cfg);
  const int s = cache.add_sequence();
  const auto k = kv_data(60, 1, 64, 5), v = kv_data(60, 1, 64, 6);
  for (int l = 0; l < 2; ++l) {
    cache.append(s, l, k.data(), v.data(), 40);
    cache.append(s, l, k.data() + 40 * 64, v.data() + 40 * 64, 10);
  }
  // Last append started at 40: a query at 40 sees 31.., so pages of 8 up to
  // position 31 went: first stored = 24.
  ASSERT_EQ(cache.first_stored(s, 0), 24);
  ASSERT_EQ(cache.sliding_window_of(0), 10);
  ASSERT_EQ(cache.sliding_window_of(1), 0);
  const size_t bytes = cache.bytes_allocated();
  const auto q = test::random_gaussian(64, 7);
  std::vector<float> out(64);
  AttentionParams p;
  p.window = 10;
  cache.attend(s, 0, q.data(), 1, p, out.data(), nullptr, 40);  // the earliest allowed
  EXPECT_NE(test::error_message([&] { cache.attend(s, 0, q.data(), 1, p, out.data(), nullptr, 32); })
                .find("freed positions [0, 24) (sliding window 10), but a query at position 32 with window 10"),
            std::string::npos);
  EXPECT_NE(test::error_message([&] { cache.attend(s, 0, q.data(), 1, AttentionParams{}, out.data()); }).find("needs position 0"),
            std::string::npos);
  AttentionParams sinks = p;
  sinks.n_sinks = 1;
  EXPECT_NE(test::error_message([&] { cache.attend(s, 0, q.data(), 1, sinks, out.data()); }).find("1 sinks"),
            std::string::npos);
  std::vector<float> kd(50 * 64), vd(kd.size());
  EXPECT_NE(test::error_message([&] { cache.dequantize(s, 0, kd.data(), vd.data()); }).find("freed positions [0, 24)"),
            std::string::npos);
  std::vector<uint8_t> kr(1000), vr(1000);
  EXPECT_NE(test::error_message([&] { cache.read_records(s, 0, 20, 1, kr.data(), vr.data()); })
                .find("stored compressed tokens are [24, 50)"),
            std::string::npos);
  cache.read_records(s, 0, 24, 1, kr.data(), vr.data());
  // Trim: back to 40 (the length before the last append) or to 0 only.
  EXPECT_NE(test::error_message([&] { cache.trim(s, 30); }).find("the shortest length it can go back to is 33"),
            std::string::npos);
  EXPECT_EQ(cache.n_tokens(s, 0), 50);
  EXPECT_EQ(cache.n_tokens(s, 1), 50);  // layer 1 (no window) untouched as well
  EXPECT_EQ(cache.bytes_allocated(), bytes);
  cache.trim(s, 40);
  EXPECT_EQ(cache.n_tokens(s, 0), 40);
  EXPECT_EQ(cache.first_stored(s, 0), 24);
  cache.attend(s, 0, q.data(), 1, p, out.data(), nullptr, 39);  // the last token again
  cache.trim(s, 0);
  EXPECT_EQ(cache.first_stored(s, 0), 0);
  EXPECT_EQ(cache.bytes_allocated(), 0u);
  cache.append(s, 0, k.data(), v.data(), 5);  // starts over
  EXPECT_EQ(cache.first_stored(s, 0), 0);
  // Config checks.
  KvCacheConfig bad = cfg;
  bad.sliding_window = {10};
  EXPECT_NE(test::error_message([&] { bad.validate(); }).find("sliding_window has 1 entries"), std::string::npos);
  bad.sliding_window = {10, -1};
  EXPECT_NE(test::error_message([&] { bad.validate(); }).find("sliding_window of layer 1 must be >= 0"), std::string::npos);
}

TEST(KvSlidingWindow, EvictEventsCarryRealBytes) {
  KvCacheConfig cfg = KvCacheConfig::from_preset("paper_mse", 1, 2, 64);
  cfg.page_tokens = 8;
  cfg.sliding_window = {8};
  KvCache cache(cfg);
  std::vector<std::string> lines;
  cache.set_event_sink([&](const std::string& l) { lines.push_back(l); });
  const int s = cache.add_sequence();
  const auto k = kv_data(40, 2, 64, 8), v = kv_data(40, 2, 64, 9);
  size_t last_bytes = 0;
  for (int t = 0; t < 40; ++t) {
    const size_t before = cache.bytes_allocated();
    const size_t n_lines = lines.size();
    cache.append(s, 0, k.data() + t * 128, v.data() + t * 128, 1);
    if (lines.size() > n_lines) {
      ASSERT_EQ(lines.size(), n_lines + 1);
      const std::string& l = lines.back();
      EXPECT_NE(l.find("\"event\":\"evict\""), std::string::npos) << l;
      // bytes_after is the allocation after the append; one page was freed.
      EXPECT_NE(l.find("\"bytes_after\":" + std::to_string(cache.bytes_allocated())), std::string::npos) << l;
      EXPECT_LE(cache.bytes_allocated(), before);
      last_bytes = cache.bytes_allocated();
    }
  }
  EXPECT_GE(lines.size(), 3u);  // pages 0, 1, 2 go by position 40
  EXPECT_GT(last_bytes, 0u);
}

}  // namespace
}  // namespace tq
