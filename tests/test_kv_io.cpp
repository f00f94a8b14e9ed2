// KV cache saved state and events: save -> load is bit-exact for every kind of
// layer state (compressed, dense by policy, before upgrade, windows that wrap,
// removed sequences); truncated, corrupted or mismatched files are refused
// with a clear error and leave the cache bit-identical; a failed save keeps
// the previous file; events carry the real byte counts.
//
// Seed defects checked here (REFERENCE.md section 6):
//  - saved state without V or QJL tensors: SaveLoadIsBitExact (V dequantized
//    separately, paper_prod's sketch and residual norms inside each record)
//    and SavedFileHoldsEveryRecordByte;
//  - upgrade events that always report 0 bytes: UpgradeEventsReportRealBytes;
//  - a memory report that counted neither V nor the real dense size:
//    MemoryReportCountsVAndRealDenseBytes.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "turboquant/error.hpp"
#include "turboquant/kv_cache.hpp"

namespace tq {
namespace {

namespace fs = std::filesystem;
using test::kv_data;

// A scratch directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("tq_kv_io_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  // Names of every entry (to catch leftover temporary files).
  std::vector<std::string> entries() const {
    std::vector<std::string> r;
    for (const auto& e : fs::directory_iterator(path_)) r.push_back(e.path().filename().string());
    std::sort(r.begin(), r.end());
    return r;
  }

 private:
  fs::path path_;
};

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}
// Writes a new file (removing any old one first: on ext4, truncating a file
// that holds data makes close() flush it, which makes every-byte loops slow).
void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::remove(path.c_str());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

// Appends n tokens to (seq, layer) in pieces of `piece` tokens, so the dense
// window's ring wraps (win_start != 0).
void fill(KvCache& c, int seq, int layer, int n, int piece, uint64_t seed) {
  const int H = c.config().n_heads_kv, d = c.config().head_dim;
  const std::vector<float> k = kv_data(n, H, d, seed), v = kv_data(n, H, d, seed + 1000);
  const size_t row = size_t(H) * d;
  for (int t = 0; t < n; t += piece) {
    const int m = std::min(piece, n - t);
    c.append(seq, layer, k.data() + t * row, v.data() + t * row, m);
  }
}

// Everything observable of a cache: ids, per (seq, layer) tokens, first
// stored position, mode, the dequantized K and V (none where a sliding window
// freed positions), attention outputs (through the layer's sliding window)
// and lse; allocated bytes.
struct Snapshot {
  std::vector<int> seqs;
  std::vector<int> tokens, first;
  std::vector<int> compressed;
  std::vector<std::vector<float>> k, v, out, lse;
  size_t bytes = 0;
};

Snapshot snapshot(const KvCache& c) {
  Snapshot s;
  const int H = c.config().n_heads_kv, d = c.config().head_dim, hq = 2 * H;
  s.seqs = c.sequences();
  s.bytes = c.bytes_allocated();
  const std::vector<float> q = test::random_gaussian(size_t(hq) * d, 77);
  for (int id : s.seqs)
    for (int l = 0; l < c.config().n_layers; ++l) {
      const int n = c.n_tokens(id, l);
      s.tokens.push_back(n);
      s.first.push_back(c.first_stored(id, l));
      s.compressed.push_back(c.is_compressed(id, l));
      std::vector<float> k, v;
      if (s.first.back() == 0) {
        k.resize(size_t(n) * H * d);
        v.resize(k.size());
        c.dequantize(id, l, k.data(), v.data());
      }
      s.k.push_back(std::move(k));
      s.v.push_back(std::move(v));
      std::vector<float> out(size_t(hq) * d), lse(hq);
      AttentionParams p;
      p.window = c.sliding_window_of(l);
      if (n > 0) c.attend(id, l, q.data(), hq, p, out.data(), lse.data());
      s.out.push_back(std::move(out));
      s.lse.push_back(std::move(lse));
    }
  return s;
}

bool bits_equal(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() ||
        (!a[i].empty() && std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0))
      return false;
  return true;
}

::testing::AssertionResult same(const Snapshot& a, const Snapshot& b) {
  if (a.seqs != b.seqs) return ::testing::AssertionFailure() << "sequence ids differ";
  if (a.tokens != b.tokens) return ::testing::AssertionFailure() << "token counts differ";
  if (a.first != b.first) return ::testing::AssertionFailure() << "first stored positions differ";
  if (a.compressed != b.compressed) return ::testing::AssertionFailure() << "layer modes differ";
  if (!bits_equal(a.k, b.k)) return ::testing::AssertionFailure() << "dequantized K differs";
  if (!bits_equal(a.v, b.v)) return ::testing::AssertionFailure() << "dequantized V differs";
  if (!bits_equal(a.out, b.out)) return ::testing::AssertionFailure() << "attention outputs differ";
  if (!bits_equal(a.lse, b.lse)) return ::testing::AssertionFailure() << "attention lse differs";
  if (a.bytes != b.bytes)
    return ::testing::AssertionFailure() << "bytes_allocated " << a.bytes << " vs " << b.bytes;
  return ::testing::AssertionSuccess();
}

// 3 layers (layer 2 dense by policy), page 8, window 3; sequences 0 and 2
// of different lengths, 1 removed, 3 empty.
// sliding: layers 0 and 2 are sliding-window layers (5 and 6 positions), so
// populate() leaves them with freed prefixes and pages.
KvCacheConfig io_config(const std::string& preset, int k_start, int head_dim = 64, bool sliding = false) {
  KvCacheConfig cfg = KvCacheConfig::from_preset(preset, 3, 2, head_dim);
  if (sliding) cfg.sliding_window = {5, 0, 6};
  cfg.page_tokens = 8;
  cfg.dense_window = 3;
  cfg.dense_prefix = 2;
  cfg.dense_layers = {2};
  cfg.k_start = k_start;
  cfg.seed = 12345;
  return cfg;
}
void populate(KvCache& c) {
  const int s0 = c.add_sequence(), s1 = c.add_sequence(), s2 = c.add_sequence();
  c.add_sequence();  // stays empty
  fill(c, s0, 0, 21, 4, 1);
  fill(c, s0, 1, 5, 2, 2);
  fill(c, s0, 2, 17, 5, 3);
  fill(c, s1, 0, 9, 9, 4);
  c.remove_sequence(s1);
  fill(c, s2, 0, 9, 1, 5);
  fill(c, s2, 1, 30, 7, 6);
  c.trim(s2, 26);  // pages and window both cut
}

const char* const kRoundTripPresets[] = {"paper_mse", "turbo2.5",  "paper_prod",
                                         "polarquant", "q4_0", "dense-f16",
                                         "k=tq-mse:b=4,hi=8,hb=8/v=tq-mse:b=2.5"};

TEST(KvIo, SaveLoadIsBitExact) {
  TempDir dir;
  for (const char* preset : kRoundTripPresets)
    for (int k_start : {0, 12})  // 12: layer 1 of sequence 0 is still dense (before upgrade)
    for (bool sliding : {false, true}) {
      SCOPED_TRACE(std::string(preset) + " k_start " + std::to_string(k_start) + " sliding " +
                   std::to_string(sliding));
      const KvCacheConfig cfg = io_config(preset, k_start, 64, sliding);
      KvCache a(cfg);
      populate(a);
      if (sliding) {  // sequence 0, layers 0 and 2: prefix and first page freed
        ASSERT_EQ(a.first_stored(0, 0), 10);
        ASSERT_EQ(a.first_stored(0, 2), 10);
        ASSERT_EQ(a.first_stored(2, 0), 2);  // the prefix only
      }
      if (k_start > 0) ASSERT_FALSE(a.is_compressed(0, 1));
      if (!is_dense(cfg.k_format.method)) ASSERT_TRUE(a.is_compressed(0, 0));
      const std::string path = dir.file("case.tqkv");
      a.save(path);
      KvCache b(cfg);
      b.add_sequence();
      fill(b, 0, 0, 40, 40, 9);  // contents that load must replace
      b.load(path);
      const Snapshot sa = snapshot(a), sb = snapshot(b);
      EXPECT_TRUE(same(sa, sb));
      // Outlier channels (channel-split formats) travel with the records.
      for (int l = 0; l < cfg.n_layers; ++l)
        for (int h = 0; h < cfg.n_heads_kv; ++h)
          for (bool key : {true, false})
            EXPECT_EQ(a.outlier_channels(l, h, key), b.outlier_channels(l, h, key)) << l << " " << h;
      EXPECT_EQ(sb.seqs, (std::vector<int>{0, 2, 3}));  // ids kept, the removed slot too
      EXPECT_EQ(a.memory().allocated.total(), b.memory().allocated.total());
      EXPECT_EQ(a.memory().used.total(), b.memory().used.total());
      // The loaded state keeps working like the original: same ring position,
      // same upgrade of a layer that was saved before its upgrade.
      for (KvCache* c : {&a, &b}) {
        fill(*c, 0, 1, 10, 3, 11);
        fill(*c, 2, 0, 4, 4, 12);
        c->add_sequence();
      }
      EXPECT_TRUE(same(snapshot(a), snapshot(b)));
      // A loaded cache saves the same bytes.
      b.save(path + ".2");
      a.save(path + ".3");
      EXPECT_EQ(read_bytes(path + ".2"), read_bytes(path + ".3"));
    }
}

TEST(KvIo, SavedFileHoldsEveryRecordByte) {
  // The file holds whole K and V records (codes, scales, QJL signs and
  // residual norms) of every token: its size is at least their sum.
  TempDir dir;
  KvCacheConfig cfg = KvCacheConfig::from_preset("paper_prod", 1, 2, 64);
  cfg.page_tokens = 8;
  KvCache a(cfg);
  a.add_sequence();
  fill(a, 0, 0, 20, 20, 3);
  const RecordBytes kr = record_bytes(cfg.k_format, 64), vr = record_bytes(cfg.v_format, 64);
  ASSERT_GT(kr.sketch, 0u);
  a.save(dir.file("p.tqkv"));
  EXPECT_GE(read_bytes(dir.file("p.tqkv")).size(), size_t(20) * 2 * (kr.total() + vr.total()));
  // The decoded keys (MSE part + QJL correction) and values survive bit for bit.
  KvCache b(cfg);
  b.load(dir.file("p.tqkv"));
  std::vector<float> ka(20 * 2 * 64), va(ka.size()), kb(ka.size()), vb(ka.size());
  a.dequantize(0, 0, ka.data(), va.data());
  b.dequantize(0, 0, kb.data(), vb.data());
  EXPECT_EQ(0, std::memcmp(ka.data(), kb.data(), ka.size() * 4));
  EXPECT_EQ(0, std::memcmp(va.data(), vb.data(), va.size() * 4));
}

// A small saved cache (paper_prod: QJL records; a window; a removed slot) and
// a target cache with other contents, for the every-byte loops.
struct SmallCase {
  KvCacheConfig cfg;
  std::vector<uint8_t> file;
};
SmallCase small_case(const TempDir& dir) {
  SmallCase c;
  c.cfg = KvCacheConfig::from_preset("paper_prod", 2, 1, 32);
  c.cfg.page_tokens = 4;
  c.cfg.dense_window = 2;
  c.cfg.dense_prefix = 1;
  c.cfg.sliding_window = {0, 3};  // sequence 2 layer 1: prefix and a page freed
  KvCache a(c.cfg);
  a.add_sequence();
  a.add_sequence();
  a.add_sequence();
  fill(a, 0, 0, 7, 3, 1);
  fill(a, 0, 1, 2, 2, 2);
  fill(a, 2, 1, 9, 2, 3);
  if (a.first_stored(2, 1) != 5) ADD_FAILURE() << "small case: first stored " << a.first_stored(2, 1);
  a.remove_sequence(1);
  a.save(dir.file("small.tqkv"));
  c.file = read_bytes(dir.file("small.tqkv"));
  return c;
}

TEST(KvIo, EveryTruncationIsRefusedAndTheCacheIsUnchanged) {
  TempDir dir;
  const SmallCase c = small_case(dir);
  KvCache target(c.cfg);
  target.add_sequence();
  fill(target, 0, 0, 6, 6, 42);
  const Snapshot before = snapshot(target);
  const std::string path = dir.file("cut.tqkv");
  for (size_t n = 0; n < c.file.size(); ++n) {
    write_bytes(path, std::vector<uint8_t>(c.file.begin(), c.file.begin() + n));
    try {
      target.load(path);
      ADD_FAILURE() << "prefix of " << n << " bytes of " << c.file.size() << " loaded";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("truncated at byte " + std::to_string(n)), std::string::npos)
          << n << ": " << msg;
      if (n >= 24)
        EXPECT_NE(msg.find("(expected " + std::to_string(c.file.size()) + ")"), std::string::npos)
            << msg;
    }
    EXPECT_THROW(KvCache::read_config(path), Error) << n;
    ASSERT_TRUE(same(before, snapshot(target))) << "after a " << n << "-byte prefix";
  }
  // Trailing garbage is refused too.
  std::vector<uint8_t> longer = c.file;
  longer.push_back(0);
  write_bytes(path, longer);
  EXPECT_THROW(target.load(path), Error);
  ASSERT_TRUE(same(before, snapshot(target)));
}

TEST(KvIo, EveryFlippedByteIsRefusedAndTheCacheIsUnchanged) {
  TempDir dir;
  const SmallCase c = small_case(dir);
  KvCache target(c.cfg);
  target.add_sequence();
  fill(target, 0, 1, 5, 5, 43);
  const Snapshot before = snapshot(target);
  const std::string path = dir.file("flip.tqkv");
  for (uint8_t mask : {uint8_t(0x01), uint8_t(0xFF)})
    for (size_t i = 0; i < c.file.size(); ++i) {
      std::vector<uint8_t> bad = c.file;
      bad[i] ^= mask;
      write_bytes(path, bad);
      EXPECT_THROW(target.load(path), Error) << "byte " << i << " mask " << int(mask);
      // Compare cheaply every time, fully now and then (the ASan build runs this).
      ASSERT_EQ(target.bytes_allocated(), before.bytes) << "byte " << i;
      if (i % 64 == 0) ASSERT_TRUE(same(before, snapshot(target))) << "byte " << i;
    }
  ASSERT_TRUE(same(before, snapshot(target)));
  // The clear messages for the fields one is likely to meet.
  auto load_error = [&](size_t i, uint8_t value) {
    std::vector<uint8_t> bad = c.file;
    bad[i] = value;
    write_bytes(path, bad);
    try {
      target.load(path);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(load_error(0, 'X').find("bad magic"), std::string::npos);
  EXPECT_NE(load_error(4, 7).find("unsupported version 7"), std::string::npos);
  EXPECT_NE(load_error(c.file.size() - 20, c.file[c.file.size() - 20] ^ 4).find("checksum mismatch"),
            std::string::npos);
  EXPECT_NE(load_error(30, c.file[30] ^ 4).find("header checksum mismatch"), std::string::npos);
  EXPECT_NE(load_error(0, 'X').find(path), std::string::npos);  // names the file
  // Not a cache file at all.
  write_bytes(path, {'h', 'e', 'l', 'l', 'o', '\n'});
  EXPECT_THROW(target.load(path), Error);
  EXPECT_THROW(target.load(dir.file("missing.tqkv")), Error);
  ASSERT_TRUE(same(before, snapshot(target)));
}

// Rewrites the size field and both checksums, so that a tampered file passes
// the checksums and only the field checks stand between it and the cache.
uint64_t fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}
uint32_t le32(const std::vector<uint8_t>& b, size_t at) {
  return uint32_t(b[at]) | uint32_t(b[at + 1]) << 8 | uint32_t(b[at + 2]) << 16 | uint32_t(b[at + 3]) << 24;
}
void put_le(std::vector<uint8_t>& b, size_t at, uint64_t x, int n) {
  for (int i = 0; i < n; ++i) b[at + i] = uint8_t(x >> (8 * i));
}
void reseal(std::vector<uint8_t>& b) {
  put_le(b, 16, b.size(), 8);
  const size_t hc = 24 + le32(b, 8);
  put_le(b, hc, fnv1a(b.data(), hc), 8);
  put_le(b, b.size() - 8, fnv1a(b.data(), b.size() - 8), 8);
}

TEST(KvIo, TamperedFieldsBehindValidChecksumsAreRefused) {
  TempDir dir;
  const SmallCase c = small_case(dir);
  KvCache target(c.cfg);
  target.add_sequence();
  fill(target, 0, 0, 5, 5, 44);
  const Snapshot before = snapshot(target);
  const std::string path = dir.file("tampered.tqkv");
  // After the header checksum: one outlier-channel flag per layer (paper_prod
  // has no channel split, so each is 0), then n_slots and slot 0.
  const size_t calib = 24 + le32(c.file, 8) + 8;
  const size_t body = calib + size_t(c.cfg.n_layers);
  const size_t layer0 = body + 4 + 1;  // flags, 3 zero, n_main, win_start, win_count, n_pre
  ASSERT_EQ(c.file[calib], 0u);
  ASSERT_EQ(le32(c.file, body), 3u);
  ASSERT_EQ(le32(c.file, layer0 + 4), 4u);  // 7 tokens: 1 in the prefix, 4 in pages, 2 in the window
  ASSERT_EQ(le32(c.file, layer0 + 16), 1u);
  struct Case {
    const char* expect;
    std::function<void(std::vector<uint8_t>&)> edit;
  };
  const std::string text(c.file.begin() + 24, c.file.begin() + calib - 8);
  auto set_config = [&](std::vector<uint8_t>& b, const std::string& from, const std::string& to) {
    ASSERT_EQ(from.size(), to.size());
    const size_t at = text.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    std::copy(to.begin(), to.end(), b.begin() + 24 + at);
  };
  const Case cases[] = {
      {"outlier-channel flag 2", [&](auto& b) { b[calib + 1] = 2; }},
      {"sequences cannot fit", [&](auto& b) { put_le(b, body, 0xFFFFFFFFu, 4); }},
      {"sequence 0 flag 2", [&](auto& b) { b[body + 4] = 2; }},
      {"unknown layer flags", [&](auto& b) { b[layer0] |= 0x80; }},
      {"unknown layer flags", [&](auto& b) { b[layer0 + 2] = 1; }},
      {"n_main 4294967295", [&](auto& b) { put_le(b, layer0 + 4, 0xFFFFFFFFu, 4); }},
      {"needs", [&](auto& b) { put_le(b, layer0 + 4, 1000, 4); }},
      {"count 3", [&](auto& b) { put_le(b, layer0 + 12, 3, 4); }},
      {"window start 2", [&](auto& b) { put_le(b, layer0 + 8, 2, 4); }},
      {"(not allocated)", [&](auto& b) { b[layer0] &= uint8_t(~2); }},
      {"dense prefix of 1 tokens (not allocated)", [&](auto& b) { b[layer0] &= uint8_t(~4); }},
      {"dense prefix of 2 tokens (allocated) with dense_prefix 1", [&](auto& b) { put_le(b, layer0 + 16, 2, 4); }},
      {"dense prefix of 0 tokens (allocated) with dense_prefix 1, 4 main",
       [&](auto& b) { put_le(b, layer0 + 16, 0, 4); }},
      // Evictions in a layer without a sliding window (layer 0).
      {"4 evicted main tokens with 4 main tokens, pages of 4, a dense prefix of 1 / 1 and sliding window 0",
       [&](auto& b) { put_le(b, layer0 + 20, 4, 4); }},
      {"0 evicted main tokens and an evicted prefix", [&](auto& b) { b[layer0] |= 8; }},
      {"sliding_window has 1 entries", [&](auto& b) { set_config(b, "sliding_window=0,3", "sliding_window=003"); }},
      {"config: key 'dense_prefix' missing", [&](auto& b) { set_config(b, "dense_prefix=", "dense_prefiy="); }},
      {"left over", [&](auto& b) { b.insert(b.end() - 8, uint8_t(0)); }},
      {"remain", [&](auto& b) { b.erase(b.end() - 9); }},
      {"config: head_dim='3x'", [&](auto& b) { set_config(b, "head_dim=32", "head_dim=3x"); }},
      {"config: key 'head_dim' missing", [&](auto& b) { set_config(b, "head_dim=", "head_dix="); }},
      {"config: k_format", [&](auto& b) { set_config(b, "k_format=tq-prod", "k_format=tq-prud"); }},
      {"config: n_heads_kv='0' is not an integer in 1..1024", [&](auto& b) { set_config(b, "n_heads_kv=1", "n_heads_kv=0"); }},
  };
  for (const Case& k : cases) {
    std::vector<uint8_t> bad = c.file;
    k.edit(bad);
    reseal(bad);
    write_bytes(path, bad);
    try {
      target.load(path);
      ADD_FAILURE() << k.expect << ": loaded";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(k.expect), std::string::npos) << e.what();
    }
    ASSERT_TRUE(same(before, snapshot(target))) << k.expect;
  }
  // The resealed but untouched file still loads (the edits above are the only cause).
  std::vector<uint8_t> good = c.file;
  reseal(good);
  EXPECT_EQ(good, c.file);
}

TEST(KvIo, Version2To4FilesStillLoad) {
  // A version 4 file is a version 5 file without the sliding_window config
  // line and n_evicted in each layer header; a version 3 file also lacks the
  // layer_formats line; a version 2 file also lacks the dense_prefix line and
  // n_pre in each layer header. Made here from a version 5 file (one
  // sequence, one layer without a channel split, no prefix) by removing them,
  // then resealed: all load into a cache with dense_prefix 0, and a version 2
  // file into one with a prefix not at all.
  TempDir dir;
  KvCacheConfig cfg = KvCacheConfig::from_preset("paper_mse", 1, 2, 64);
  cfg.page_tokens = 8;
  cfg.dense_window = 3;
  KvCache a(cfg);
  a.add_sequence();
  fill(a, 0, 0, 19, 5, 7);
  a.save(dir.file("v5.tqkv"));
  std::vector<uint8_t> f = read_bytes(dir.file("v5.tqkv"));
  ASSERT_EQ(le32(f, 4), 5u);
  auto drop_line = [&](const std::string& line) {
    const std::string text(f.begin() + 24, f.begin() + 24 + le32(f, 8));
    const size_t at = text.find(line);
    ASSERT_NE(at, std::string::npos) << line;
    f.erase(f.begin() + 24 + at, f.begin() + 24 + at + line.size());
    put_le(f, 8, text.size() - line.size(), 4);
  };
  drop_line("sliding_window=\n");
  put_le(f, 4, 4, 4);
  {
    const size_t layer0 = 24 + le32(f, 8) + 8 + 1 + 4 + 1;  // calib flag, n_slots, live
    ASSERT_EQ(le32(f, layer0 + 20), 0u);  // n_evicted, gone in version 4
    f.erase(f.begin() + layer0 + 20, f.begin() + layer0 + 24);
  }
  // Writes f (resealed) as `name`; it must load as the cache that was saved.
  auto loads_as_saved = [&](const std::string& name) {
    reseal(f);
    write_bytes(dir.file(name), f);
    KvCache b(cfg);
    b.load(dir.file(name));
    EXPECT_TRUE(same(snapshot(a), snapshot(b))) << name;
  };
  loads_as_saved("v4.tqkv");
  drop_line("layer_formats=\n");
  put_le(f, 4, 3, 4);
  loads_as_saved("v3.tqkv");
  drop_line("dense_prefix=0\n");
  put_le(f, 4, 2, 4);
  const size_t layer0 = 24 + le32(f, 8) + 8 + 1 + 4 + 1;  // calib flag, n_slots, live
  ASSERT_EQ(le32(f, layer0 + 4), 16u);  // n_main (3 in the window)
  ASSERT_EQ(le32(f, layer0 + 16), 0u);  // n_pre, gone in version 2
  f.erase(f.begin() + layer0 + 16, f.begin() + layer0 + 20);
  loads_as_saved("v2.tqkv");
  KvCacheConfig with_prefix = cfg;
  with_prefix.dense_prefix = 4;
  KvCache c(with_prefix);
  try {
    c.load(dir.file("v2.tqkv"));
    ADD_FAILURE() << "a version 2 file loaded into a cache with a dense prefix";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dense_prefix file 0 vs cache 4"), std::string::npos) << e.what();
  }
}

TEST(KvIo, LayerFormatsTravelWithTheFile) {
  // Layer 1 in its own format (a channel split: its outlier channels are
  // chosen and saved per layer), layer 0 in the cache's; layer 2 dense.
  TempDir dir;
  KvCacheConfig cfg = io_config("turbo3", 0);
  cfg.layer_formats = parse_layer_formats("1=turbo4-out", cfg.n_layers);
  KvCache a(cfg);
  populate(a);
  EXPECT_NE(a.k_quantizer(0).bytes_per_vector(), a.k_quantizer(1).bytes_per_vector());
  EXPECT_TRUE(a.outlier_channels(0, 0, true).empty());
  EXPECT_EQ(a.outlier_channels(1, 0, true).size(), 8u);  // 1/8 of 64
  const std::string path = dir.file("lf.tqkv");
  a.save(path);
  const KvCacheConfig r = KvCache::read_config(path);
  EXPECT_EQ(layer_formats_text(r.layer_formats), "1=k=" + to_string(parse_format("tq-mse:b=4,hi=12.5%,hb=6")) +
                                                     "/v=" + to_string(parse_format("tq-mse:b=4")));
  KvCache b(r);
  b.load(path);
  EXPECT_TRUE(same(snapshot(a), snapshot(b)));
  for (int h = 0; h < cfg.n_heads_kv; ++h)
    EXPECT_EQ(a.outlier_channels(1, h, true), b.outlier_channels(1, h, true));
  // Without the policy, or with another one, the file is refused by name.
  for (const char* policy : {"", "1=turbo4", "0=turbo4-out"}) {
    KvCacheConfig other = cfg;
    other.layer_formats = parse_layer_formats(policy, cfg.n_layers);
    KvCache c(other);
    const Snapshot before = snapshot(c);
    try {
      c.load(path);
      ADD_FAILURE() << "loaded with layer policy '" << policy << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("layer_formats file '1=k="), std::string::npos) << e.what();
    }
    EXPECT_TRUE(same(before, snapshot(c)));
  }
}

TEST(KvIo, ConfigMismatchNamesTheFieldAndLeavesTheCacheUnchanged) {
  TempDir dir;
  KvCacheConfig cfg = KvCacheConfig::from_preset("paper_mse", 2, 2, 64);
  cfg.page_tokens = 8;
  cfg.dense_window = 2;
  KvCache a(cfg);
  a.add_sequence();
  fill(a, 0, 0, 10, 10, 1);
  const std::string path = dir.file("a.tqkv");
  a.save(path);
  struct Case {
    const char* field;
    void (*change)(KvCacheConfig&);
  };
  const Case cases[] = {
      {"n_layers", [](KvCacheConfig& c) { c.n_layers = 3; }},
      {"n_heads_kv", [](KvCacheConfig& c) { c.n_heads_kv = 1; }},
      {"head_dim file 64 vs cache 128", [](KvCacheConfig& c) { c.head_dim = 128; }},
      {"page_tokens", [](KvCacheConfig& c) { c.page_tokens = 16; }},
      {"dense_window", [](KvCacheConfig& c) { c.dense_window = 0; }},
      {"dense_prefix file 0 vs cache 3", [](KvCacheConfig& c) { c.dense_prefix = 3; }},
      {"k_start", [](KvCacheConfig& c) { c.k_start = 4; }},
      {"seed", [](KvCacheConfig& c) { c.seed = 99; }},
      {"k_format file 'tq-mse:b=3' vs cache 'tq-mse:b=4'",
       [](KvCacheConfig& c) { c.k_format = parse_format("tq-mse:b=4"); }},
      {"v_format", [](KvCacheConfig& c) { c.v_format = parse_format("tq-mse:b=3"); }},
      {"dense_format", [](KvCacheConfig& c) { c.dense_format = parse_format("bf16"); }},
      {"dense_layers file [] vs cache [1]", [](KvCacheConfig& c) { c.dense_layers = {1}; }},
      {"sliding_window of layer 1 file 0 vs cache 8", [](KvCacheConfig& c) { c.sliding_window = {0, 8}; }},
  };
  for (const Case& k : cases) {
    KvCacheConfig other = cfg;
    k.change(other);
    KvCache b(other);
    b.add_sequence();
    fill(b, 0, 0, 3, 3, 5);
    const Snapshot before = snapshot(b);
    try {
      b.load(path);
      ADD_FAILURE() << k.field << ": loaded";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("config mismatch: ") + k.field),
                std::string::npos)
          << e.what();
    }
    EXPECT_TRUE(same(before, snapshot(b))) << k.field;
  }
  // The preset name is only a label.
  KvCacheConfig renamed = cfg;
  renamed.preset = "my-name";
  KvCache c(renamed);
  EXPECT_NO_THROW(c.load(path));
}

TEST(KvIo, ReadConfigRoundTrips) {
  TempDir dir;
  KvCacheConfig cfg = KvCacheConfig::from_preset("k=tq-prod:b=3,m=32/v=tq-mse:b=2.5,hi=16", 5, 3, 64);
  cfg.dense_format = parse_format("bf16");
  cfg.page_tokens = 12;
  cfg.dense_window = 7;
  cfg.dense_prefix = 5;
  cfg.dense_layers = {4, 0};
  cfg.k_start = 33;
  cfg.seed = 0xFEDCBA9876543210ull;
  cfg.sliding_window = {0, 9, 0, 0, 3};
  KvCache a(cfg);
  a.save(dir.file("c.tqkv"));
  const KvCacheConfig r = KvCache::read_config(dir.file("c.tqkv"));
  EXPECT_EQ(r.sliding_window, cfg.sliding_window);
  EXPECT_EQ(r.preset, cfg.preset);
  EXPECT_EQ(r.n_layers, cfg.n_layers);
  EXPECT_EQ(r.n_heads_kv, cfg.n_heads_kv);
  EXPECT_EQ(r.head_dim, cfg.head_dim);
  EXPECT_EQ(r.page_tokens, cfg.page_tokens);
  EXPECT_EQ(r.dense_window, cfg.dense_window);
  EXPECT_EQ(r.dense_prefix, cfg.dense_prefix);
  EXPECT_EQ(r.dense_layers, cfg.dense_layers);
  EXPECT_EQ(r.k_start, cfg.k_start);
  EXPECT_EQ(r.seed, cfg.seed);
  EXPECT_EQ(r.k_format, cfg.k_format);
  EXPECT_EQ(r.v_format, cfg.v_format);
  EXPECT_EQ(r.dense_format, cfg.dense_format);
  KvCache b(r);  // a cache built from it loads the file
  EXPECT_NO_THROW(b.load(dir.file("c.tqkv")));
  try {
    KvCache::read_config(dir.file("missing.tqkv"));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.tqkv"), std::string::npos) << e.what();
  }
}

TEST(KvIo, FailedSaveKeepsTheExistingFile) {
  TempDir dir;
  KvCacheConfig cfg = KvCacheConfig::from_preset("turbo4", 1, 2, 64);
  KvCache a(cfg);
  a.add_sequence();
  fill(a, 0, 0, 50, 50, 1);
  const std::string path = dir.file("keep.tqkv");
  KvCache old(cfg);
  old.add_sequence();
  fill(old, 0, 0, 3, 3, 2);
  old.save(path);
  const std::vector<uint8_t> kept = read_bytes(path);

  // 1. The write fails part-way (a file-size limit; works as root, unlike a
  //    read-only directory).
  {
    struct rlimit lim0;
    ASSERT_EQ(0, getrlimit(RLIMIT_FSIZE, &lim0));
    auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = lim0;
    lim.rlim_cur = 1000;
    ASSERT_EQ(0, setrlimit(RLIMIT_FSIZE, &lim));
    bool threw = false;
    try {
      a.save(path);
    } catch (const Error& e) {
      threw = true;
      EXPECT_NE(std::string(e.what()).find("is unchanged"), std::string::npos) << e.what();
    }
    setrlimit(RLIMIT_FSIZE, &lim0);
    std::signal(SIGXFSZ, old_handler);
    EXPECT_TRUE(threw);
    EXPECT_EQ(read_bytes(path), kept);
    EXPECT_EQ(dir.entries(), std::vector<std::string>{"keep.tqkv"});  // no temporary left
  }
  // 2. The rename fails (the target is a non-empty directory).
  {
    const std::string d = dir.file("adir");
    fs::create_directories(d + "/inside");
    EXPECT_THROW(a.save(d), Error);
    EXPECT_TRUE(fs::is_directory(d + "/inside"));
    EXPECT_EQ(dir.entries(), (std::vector<std::string>{"adir", "keep.tqkv"}));
  }
  // 3. The temporary cannot be created.
  EXPECT_THROW(a.save(dir.file("no/such/dir/x.tqkv")), Error);
  // The kept file still loads as what it was; a save that works replaces it.
  KvCache b(cfg);
  b.load(path);
  EXPECT_TRUE(same(snapshot(old), snapshot(b)));
  a.save(path);
  b.load(path);
  EXPECT_TRUE(same(snapshot(a), snapshot(b)));
}

// ---- Events -------------------------------------------------------------------

// The value of "key" in a flat JSON line: a number or a string.
std::string json_field(const std::string& line, const std::string& key) {
  const std::string k = "\"" + key + "\":";
  const size_t p = line.find(k);
  if (p == std::string::npos) return "<missing>";
  size_t b = p + k.size();
  if (line[b] == '"') return line.substr(b + 1, line.find('"', b + 1) - b - 1);
  size_t e = b;
  while (e < line.size() && line[e] != ',' && line[e] != '}') ++e;
  return line.substr(b, e - b);
}
double jnum(const std::string& line, const std::string& key) {
  return std::strtod(json_field(line, key).c_str(), nullptr);
}
bool well_formed(const std::string& line) {
  if (line.empty() || line.front() != '{' || line.back() != '}') return false;
  for (const char* k : {"event", "seq", "layer", "tokens", "bytes_before", "bytes_after", "ratio", "us"})
    if (json_field(line, k) == "<missing>") return false;
  return line.find('\n') == std::string::npos;
}

TEST(KvIo, UpgradeEventsReportRealBytes) {
  const int H = 2, d = 64, P = 8, W = 3, L = 2;
  KvCacheConfig cfg = KvCacheConfig::from_preset("paper_mse", L, H, d);
  cfg.page_tokens = P;
  cfg.dense_window = W;
  cfg.k_start = 12;
  KvCache c(cfg);
  std::vector<std::string> lines;
  c.set_event_sink([&](const std::string& s) { lines.push_back(s); });
  const int s0 = c.add_sequence(), s1 = c.add_sequence();
  const size_t db = bytes_per_vector(cfg.dense_format, d);
  const size_t kb = bytes_per_vector(cfg.k_format, d), vb = bytes_per_vector(cfg.v_format, d);

  // An automatic upgrade: 14 tokens cross k_start = 12.
  fill(c, s1, 1, 10, 10, 1);
  EXPECT_TRUE(lines.empty());
  const size_t alloc0 = c.bytes_allocated();
  fill(c, s1, 1, 4, 4, 2);
  ASSERT_EQ(lines.size(), 1u);
  const std::string& up = lines[0];
  EXPECT_TRUE(well_formed(up)) << up;
  EXPECT_EQ(json_field(up, "event"), "upgrade");
  EXPECT_EQ(jnum(up, "seq"), s1);
  EXPECT_EQ(jnum(up, "layer"), 1);
  EXPECT_EQ(jnum(up, "tokens"), 14);
  // 11 main tokens -> 2 pages; the window buffers (W slots) stay dense.
  const double before = 2.0 * P * H * 2 * db + 2.0 * W * H * db;
  const double after = 2.0 * P * H * (kb + vb) + 2.0 * W * H * db;
  EXPECT_EQ(jnum(up, "bytes_before"), before) << up;
  EXPECT_EQ(jnum(up, "bytes_after"), after) << up;
  EXPECT_GT(jnum(up, "bytes_after"), 0);
  EXPECT_LT(jnum(up, "bytes_after"), jnum(up, "bytes_before"));
  // The real allocator agrees: what the upgrade released is before - after
  // (the append itself added one dense page on top of alloc0).
  EXPECT_EQ(double(c.bytes_allocated()), double(alloc0) + P * H * 2 * db - (before - after));
  EXPECT_TRUE(test::close(jnum(up, "ratio"), 14.0 * H * d * 4 / after, 0, 1e-5)) << up;
  EXPECT_GE(jnum(up, "us"), 0);

  // An explicit upgrade: one line per converted layer.
  lines.clear();
  fill(c, s0, 0, 5, 5, 3);
  fill(c, s0, 1, 6, 6, 4);
  EXPECT_TRUE(lines.empty());
  EXPECT_EQ(c.upgrade(1), 2);  // s1 layer 0 is empty: not converted at k_start 1
  ASSERT_EQ(lines.size(), 2u);
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(json_field(lines[l], "event"), "upgrade");
    EXPECT_EQ(jnum(lines[l], "seq"), s0);
    EXPECT_EQ(jnum(lines[l], "layer"), l);
    EXPECT_EQ(jnum(lines[l], "tokens"), 5 + l);
    EXPECT_GT(jnum(lines[l], "bytes_after"), 0);
    EXPECT_LT(jnum(lines[l], "bytes_after"), jnum(lines[l], "bytes_before"));
  }
  EXPECT_EQ(c.upgrade(1), 0);  // idempotent: nothing converted, nothing reported
  EXPECT_EQ(lines.size(), 2u);
}

TEST(KvIo, TrimSaveLoadEmitOneLineEach) {
  TempDir dir;
  KvCacheConfig cfg = KvCacheConfig::from_preset("paper_prod", 2, 2, 64);
  cfg.page_tokens = 8;
  cfg.dense_window = 2;
  KvCache c(cfg);
  const int s = c.add_sequence();
  fill(c, s, 0, 30, 30, 1);
  fill(c, s, 1, 20, 20, 2);
  std::vector<std::string> lines;
  c.set_event_sink([&](const std::string& l) { lines.push_back(l); });

  const size_t b0 = c.bytes_allocated();
  c.trim(s, 9);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_TRUE(well_formed(lines[0])) << lines[0];
  EXPECT_EQ(json_field(lines[0], "event"), "trim");
  EXPECT_EQ(jnum(lines[0], "seq"), s);
  EXPECT_EQ(jnum(lines[0], "layer"), -1);
  EXPECT_EQ(jnum(lines[0], "tokens"), 18);  // 9 per layer
  EXPECT_EQ(jnum(lines[0], "bytes_before"), double(b0));  // the only sequence
  EXPECT_EQ(jnum(lines[0], "bytes_after"), double(c.bytes_allocated()));
  EXPECT_LT(jnum(lines[0], "bytes_after"), jnum(lines[0], "bytes_before"));

  const std::string path = dir.file("e.tqkv");
  c.save(path);
  ASSERT_EQ(lines.size(), 2u);
  const KvMemoryReport m = c.memory();
  EXPECT_EQ(json_field(lines[1], "event"), "save");
  EXPECT_EQ(jnum(lines[1], "seq"), -1);
  EXPECT_EQ(jnum(lines[1], "layer"), -1);
  EXPECT_EQ(jnum(lines[1], "tokens"), double(m.tokens));
  EXPECT_EQ(jnum(lines[1], "bytes_before"), double(m.allocated.total()));
  EXPECT_EQ(jnum(lines[1], "bytes_after"), double(m.allocated.total()));
  EXPECT_TRUE(test::close(jnum(lines[1], "ratio"),
                          double(m.dense_equivalent) / double(m.allocated.total()), 0, 1e-5));

  KvCache other(cfg);
  other.add_sequence();
  fill(other, 0, 0, 3, 3, 3);
  const size_t ob = other.bytes_allocated();
  std::vector<std::string> other_lines;
  other.set_event_sink([&](const std::string& l) { other_lines.push_back(l); });
  other.load(path);
  ASSERT_EQ(other_lines.size(), 1u);
  EXPECT_EQ(json_field(other_lines[0], "event"), "load");
  EXPECT_EQ(jnum(other_lines[0], "bytes_before"), double(ob));
  EXPECT_EQ(jnum(other_lines[0], "bytes_after"), double(c.bytes_allocated()));
  EXPECT_EQ(jnum(other_lines[0], "tokens"), double(m.tokens));
  EXPECT_EQ(lines.size(), 2u);  // one cache's sink does not see the other's events

  // A failed load emits nothing.
  EXPECT_THROW(other.load(dir.file("missing")), Error);
  EXPECT_EQ(other_lines.size(), 1u);

  // No sink: no events.
  c.set_event_sink({});
  c.trim(s, 2);
  c.upgrade(0);
  c.save(path);
  EXPECT_EQ(lines.size(), 2u);

  // A sink that throws does not turn a completed operation into an error.
  c.set_event_sink([](const std::string&) { throw std::runtime_error("sink broke"); });
  EXPECT_NO_THROW(c.trim(s, 1));
  EXPECT_EQ(c.n_tokens(s, 0), 1);
}

TEST(KvIo, FileSinkAppendsLines) {
  TempDir dir;
  const std::string log = dir.file("events.jsonl");
  { std::ofstream(log) << "earlier line\n"; }
  KvCacheConfig cfg = KvCacheConfig::from_preset("turbo3", 1, 1, 32);
  cfg.k_start = 4;
  {
    KvCache c(cfg);
    c.set_event_sink(KvCache::file_sink(log));
    c.add_sequence();
    fill(c, 0, 0, 5, 5, 1);  // upgrade
    c.trim(0, 2);            // trim
    c.save(dir.file("x.tqkv"));
  }
  std::ifstream in(log);
  std::vector<std::string> got;
  for (std::string l; std::getline(in, l);) got.push_back(l);
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got[0], "earlier line");
  EXPECT_EQ(json_field(got[1], "event"), "upgrade");
  EXPECT_EQ(json_field(got[2], "event"), "trim");
  EXPECT_EQ(json_field(got[3], "event"), "save");
  for (size_t i = 1; i < got.size(); ++i) EXPECT_TRUE(well_formed(got[i])) << got[i];
  try {
    KvCache::file_sink(dir.file("no/such/dir/events.jsonl"));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no/such/dir/events.jsonl"), std::string::npos) << e.what();
  }
}

// ---- Memory accounting ------------------------------------------------------------

TEST(KvIo, MemoryReportCountsVAndRealDenseBytes) {
  for (const auto& preset : kv_presets()) {
    SCOPED_TRACE(preset.name);
    const int H = 2, d = 64, P = 8, W = 3;
    KvCacheConfig cfg = KvCacheConfig::from_preset(preset.name, 3, H, d);
    cfg.page_tokens = P;
    cfg.dense_window = W;
    cfg.dense_layers = {2};
    cfg.k_start = 0;
    KvCache c(cfg);
    const int s = c.add_sequence();
    fill(c, s, 0, 13, 13, 1);
    fill(c, s, 2, 10, 10, 2);
    const KvMemoryReport m = c.memory();
    // What the report says is what the allocator holds.
    EXPECT_EQ(m.allocated.total(), c.bytes_allocated());
    const size_t kb = bytes_per_vector(cfg.k_format, d), vb = bytes_per_vector(cfg.v_format, d);
    const size_t db = bytes_per_vector(cfg.dense_format, d);
    // Used: K and V of the main tokens, both dense K and V of window tokens.
    const size_t used = size_t(10) * H * (kb + vb) + size_t(3) * H * 2 * db  // layer 0
                        + size_t(7) * H * 2 * db + size_t(3) * H * 2 * db;   // layer 2 (dense)
    EXPECT_EQ(m.used.total(), used);
    EXPECT_EQ(m.tokens, 23u);
    EXPECT_EQ(m.dense_equivalent, size_t(23) * H * d * 2 * 2);  // bf16 K + V
  }
}

}  // namespace
}  // namespace tq
