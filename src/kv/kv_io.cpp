// KvCache saved state (save, load, read_config) and events (upgrade, trim,
// save and load as JSON lines to a caller-chosen sink).
//
// ---- The cache file, version 5 (also in docs/formats.md) -------------------
// Little-endian throughout; no field depends on the machine or SIMD width.
// Written to PATH.tmp.<pid>.<n>, synced, then renamed over PATH.
//
//   FileHeader (24 bytes)
//     char[4] magic "TQKV" | u32 version = 5 | u32 header_len | u32 flags = 0
//     u64 file_size (the whole file, final checksum included)
//   config text, header_len bytes: "key=value\n" lines, every key exactly once:
//     preset, n_layers, n_heads_kv, head_dim, page_tokens, dense_window,
//     dense_prefix (version 3; older files: 0), k_start, seed, k_format,
//     v_format, dense_format (spec strings, to_string of FormatSpec, which
//     parse_format reads back exactly), dense_layers (comma-separated layer
//     indices, possibly empty), layer_formats (version 4; older files: none;
//     layer_formats_text: "L=k=SPEC/v=SPEC" joined by '+', possibly empty),
//     sliding_window (version 5; older files: none; one integer per layer,
//     comma-separated, or empty for none)
//   u64 header checksum: FNV-1a 64 of every byte before it (lets read_config
//     check the config without reading the records)
//   outlier channels (version 2), per layer 0 .. n_layers-1: u8 calibrated
//     (0/1); when 1, for K then V if that format has a channel split:
//     n_heads_kv x hi_channels u16 channel indices, ascending per head (the
//     channels each head codes at the higher width; KvCache::outlier_channels).
//     Version 1 files have no such section; their channel-split layers use
//     the default channels 0 .. hi-1, which is how version 1 encoded them.
//   u32 n_slots: sequence ids 0 .. n_slots-1, removed ones included
//   per slot: u8 live (0 = removed, 1 = present); a present sequence has, per
//   layer 0 .. n_layers-1:
//     LayerHeader (24 bytes; 20 before version 5, without n_evicted; 16
//     before version 3, without n_pre)
//       u8 flags (bit 0: main region compressed, bit 1: window buffers
//       allocated, bit 2: prefix buffers allocated, bit 3: prefix evicted by
//       the sliding window; other bits 0) | u8[3] zero | u32 n_main |
//       u32 win_start | u32 win_count | u32 n_pre | u32 n_evicted (main
//       tokens 0 .. n_evicted-1 freed, a multiple of page_tokens)
//     K records of the dense prefix (tokens 0 .. n_pre-1, none when evicted):
//                                                       [n_pre, n_heads_kv, db]
//     V records of the dense prefix:                    [n_pre, n_heads_kv, db]
//     K records of stored main tokens (n_evicted ..), token-major:
//                                              [n_main - n_evicted, n_heads_kv, kb]
//     V records of stored main tokens:         [n_main - n_evicted, n_heads_kv, vb]
//     K records of the window, oldest token first:         [win_count, n_heads_kv, db]
//     V records of the window:                             [win_count, n_heads_kv, db]
//   u64 checksum: FNV-1a 64 of every byte before it
//
// kb, vb: bytes_per_vector of the layer's k_format_of / v_format_of when it is
// compressed, else of dense_format; db: of dense_format. A record is the
// format's whole record (format.hpp): codes, scales, QJL signs and residual
// norms all travel inside it, so nothing of a format can be left out.
// win_start is the ring position of the oldest window token; keeping it makes
// a loaded cache byte-for-byte the cache that was saved (same attention
// results bit for bit), as does bit 1 (same allocated bytes).
//
// FNV-1a detects every change confined to one byte (each step is a bijection
// of the state), so a flipped byte is always reported, never loaded.
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <chrono>
#include <charconv>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <map>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kv/kv_cache_impl.hpp"
#include "turboquant/error.hpp"
#include "turboquant/kv_cache.hpp"

namespace tq {
namespace {

constexpr char kMagic[4] = {'T', 'Q', 'K', 'V'};
// 1 (no outlier channels), 2 (no dense prefix), 3 (no layer formats), 4 (no
// sliding windows) are still read.
constexpr uint32_t kVersion = 5;
constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ull, kFnvPrime = 0x100000001b3ull;
constexpr uint32_t kMaxHeaderLen = 1u << 20;  // config text is a few hundred bytes
constexpr uint8_t kFlagCompressed = 1, kFlagWindow = 2, kFlagPrefix = 4, kFlagPrefixEvicted = 8;

// The fixed part of the file; serialized field by field (little-endian), the
// struct only pins the layout.
struct FileHeader {
  char magic[4];
  uint32_t version;
  uint32_t header_len;
  uint32_t flags;
  uint64_t file_size;
};
static_assert(sizeof(FileHeader) == 24);
constexpr size_t kFileHeaderBytes = 24;

struct LayerHeader {
  uint8_t flags;
  uint8_t zero[3];
  uint32_t n_main, win_start, win_count;
  uint32_t n_pre;      // version 3
  uint32_t n_evicted;  // version 5
};
static_assert(sizeof(LayerHeader) == 24);

uint64_t fnv1a(uint64_t h, const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * kFnvPrime;
  return h;
}

uint32_t get_u32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
uint64_t get_u64(const uint8_t* p) { return uint64_t(get_u32(p)) | uint64_t(get_u32(p + 4)) << 32; }

std::string hex64(uint64_t x) {
  char b[19];
  std::snprintf(b, sizeof b, "0x%016" PRIx64, x);
  return b;
}

// ---- Writing ----------------------------------------------------------------

// Byte sink of the serializer: with no file it only counts (the first pass,
// which sizes the file); with one it hashes and writes through a buffer.
class Out {
 public:
  explicit Out(std::FILE* f = nullptr) : f_(f) {
    if (f_) buf_.reserve(kBuf);
  }
  void put(const void* data, size_t n) {
    size_ += n;
    if (!f_) return;
    const uint8_t* p = static_cast<const uint8_t*>(data);
    hash_ = fnv1a(hash_, p, n);
    while (n > 0) {
      const size_t take = std::min(n, kBuf - buf_.size());
      buf_.insert(buf_.end(), p, p + take);
      p += take;
      n -= take;
      if (buf_.size() == kBuf) flush();
    }
  }
  void u8(uint8_t x) { put(&x, 1); }
  void u32(uint32_t x) {
    const uint8_t b[4] = {uint8_t(x), uint8_t(x >> 8), uint8_t(x >> 16), uint8_t(x >> 24)};
    put(b, 4);
  }
  void u64(uint64_t x) {
    u32(uint32_t(x));
    u32(uint32_t(x >> 32));
  }
  void flush() {
    if (f_ && !buf_.empty()) {
      if (std::fwrite(buf_.data(), 1, buf_.size(), f_) != buf_.size()) ok_ = false;
      buf_.clear();
    }
  }
  uint64_t hash() const { return hash_; }
  size_t size() const { return size_; }
  bool ok() const { return ok_; }

 private:
  static constexpr size_t kBuf = size_t(1) << 20;
  std::FILE* f_;
  std::vector<uint8_t> buf_;
  uint64_t hash_ = kFnvOffset;
  size_t size_ = 0;
  bool ok_ = true;
};

std::string config_text(const KvCacheConfig& c) {
  std::string layers;
  for (size_t i = 0; i < c.dense_layers.size(); ++i) {
    if (i) layers += ',';
    layers += std::to_string(c.dense_layers[i]);
  }
  std::string windows;
  for (size_t i = 0; i < c.sliding_window.size(); ++i) {
    if (i) windows += ',';
    windows += std::to_string(c.sliding_window[i]);
  }
  return "preset=" + c.preset + "\nn_layers=" + std::to_string(c.n_layers) +
         "\nn_heads_kv=" + std::to_string(c.n_heads_kv) + "\nhead_dim=" + std::to_string(c.head_dim) +
         "\npage_tokens=" + std::to_string(c.page_tokens) +
         "\ndense_window=" + std::to_string(c.dense_window) +
         "\ndense_prefix=" + std::to_string(c.dense_prefix) + "\nk_start=" + std::to_string(c.k_start) +
         "\nseed=" + std::to_string(c.seed) + "\nk_format=" + to_string(c.k_format) +
         "\nv_format=" + to_string(c.v_format) + "\ndense_format=" + to_string(c.dense_format) +
         "\ndense_layers=" + layers + "\nlayer_formats=" + layer_formats_text(c.layer_formats) +
         "\nsliding_window=" + windows + "\n";
}

// The whole file; the caller holds the sequence lock (shared).
void write_file(Out& o, const KvCache::Impl& impl, const std::string& text, uint64_t file_size) {
  const KvCacheConfig& cfg = impl.cfg;
  const int H = cfg.n_heads_kv, W = cfg.dense_window;
  o.put(kMagic, 4);
  o.u32(kVersion);
  o.u32(static_cast<uint32_t>(text.size()));
  o.u32(0);
  o.u64(file_size);
  o.put(text.data(), text.size());
  o.u64(o.hash());  // header checksum
  for (int l = 0; l < cfg.n_layers; ++l) {
    const bool cal = impl.is_calibrated(l);
    o.u8(cal ? 1 : 0);
    if (!cal) continue;
    for (const auto* his : {&impl.layers[l].k_hi, &impl.layers[l].v_hi})
      for (const std::vector<int>& hi : *his)
        for (int c : hi) o.put(std::array<uint8_t, 2>{uint8_t(c), uint8_t(c >> 8)}.data(), 2);
  }
  o.u32(static_cast<uint32_t>(impl.seqs.size()));
  const size_t db = impl.db();
  for (const auto& sq : impl.seqs) {
    o.u8(sq ? 1 : 0);
    if (!sq) continue;
    for (int l = 0; l < cfg.n_layers; ++l) {
      const SeqLayer& s = sq->layers[l];
      o.u8(uint8_t((s.compressed ? kFlagCompressed : 0) | (s.win_k.data() ? kFlagWindow : 0) |
                   (s.pre_k.data() ? kFlagPrefix : 0) | (s.pre_evicted ? kFlagPrefixEvicted : 0)));
      o.u8(0), o.u8(0), o.u8(0);
      o.u32(uint32_t(s.n_main));
      o.u32(uint32_t(s.win_start));
      o.u32(uint32_t(s.win_count));
      o.u32(uint32_t(s.n_pre));
      o.u32(uint32_t(s.n_evicted));
      if (!s.pre_evicted)
        for (const Buffer* b : {&s.pre_k, &s.pre_v})
          for (int t = 0; t < s.n_pre; ++t)
            for (int h = 0; h < H; ++h) o.put(impl.pre_rec(*b, h, t), db);
      const size_t kb = impl.main_k(l, s.compressed).bytes_per_vector();
      const size_t vb = impl.main_v(l, s.compressed).bytes_per_vector();
      for (int t = s.n_evicted; t < s.n_main; ++t)
        for (int h = 0; h < H; ++h) o.put(impl.k_rec(s, kb, h, t), kb);
      for (int t = s.n_evicted; t < s.n_main; ++t)
        for (int h = 0; h < H; ++h) o.put(impl.v_rec(s, kb, vb, h, t), vb);
      for (const Buffer* b : {&s.win_k, &s.win_v})
        for (int i = 0; i < s.win_count; ++i)
          for (int h = 0; h < H; ++h) o.put(impl.win_rec(*b, h, (s.win_start + i) % std::max(W, 1)), db);
    }
  }
  o.u64(o.hash());  // file checksum
}

// ---- Reading ----------------------------------------------------------------

// Bounds-checked cursor over bytes [0, end) of a file held in memory.
class Reader {
 public:
  Reader(const std::string& path, const uint8_t* p, size_t end, size_t pos)
      : path_(path), p_(p), end_(end), pos_(pos) {}
  const uint8_t* take(size_t n, const char* what) {
    if (n > end_ - pos_)
      TQ_THROW("KV cache file '", path_, "': corrupt: ", what, " at byte ", pos_, " needs ", n,
               " bytes but only ", end_ - pos_, " remain before the checksum");
    const uint8_t* r = p_ + pos_;
    pos_ += n;
    return r;
  }
  uint8_t u8(const char* what) { return *take(1, what); }
  uint16_t u16(const char* what) {
    const uint8_t* b = take(2, what);
    return uint16_t(b[0] | b[1] << 8);
  }
  uint32_t u32(const char* what) { return get_u32(take(4, what)); }
  size_t pos() const { return pos_; }
  size_t remaining() const { return end_ - pos_; }

 private:
  const std::string& path_;
  const uint8_t* p_;
  size_t end_, pos_;
};

struct Header {
  uint32_t version = 0;
  KvCacheConfig cfg;
  uint64_t file_size = 0;
  size_t body_offset = 0;  // first byte after the header checksum
};

[[noreturn]] void fail(const std::string& path, const std::string& msg) {
  TQ_THROW("KV cache file '", path, "': ", msg);
}

long long parse_int(const std::string& path, const std::string& key, const std::string& v,
                    long long lo, long long hi) {
  long long x = 0;
  const auto r = std::from_chars(v.data(), v.data() + v.size(), x);
  if (r.ec != std::errc() || r.ptr != v.data() + v.size() || v.empty() || x < lo || x > hi)
    fail(path, "config: " + key + "='" + v + "' is not an integer in " + std::to_string(lo) +
                   ".." + std::to_string(hi));
  return x;
}

KvCacheConfig parse_config(const std::string& path, const std::string& text, uint32_t version) {
  std::map<std::string, std::string> kv;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) fail(path, "config: last line is not terminated by a newline");
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    const size_t eq = line.find('=');
    if (eq == std::string::npos) fail(path, "config: line '" + line + "' is not key=value");
    const std::string key = line.substr(0, eq);
    if (!kv.emplace(key, line.substr(eq + 1)).second) fail(path, "config: key '" + key + "' repeated");
  }
  std::vector<std::string> keys = {"preset",   "n_layers", "n_heads_kv",   "head_dim",
                                   "page_tokens", "dense_window", "k_start", "seed",
                                   "k_format", "v_format", "dense_format", "dense_layers"};
  if (version >= 3) keys.push_back("dense_prefix");
  if (version >= 4) keys.push_back("layer_formats");
  if (version >= 5) keys.push_back("sliding_window");
  for (const std::string& k : keys)
    if (!kv.count(k)) fail(path, "config: key '" + k + "' missing");
  if (kv.size() != keys.size())
    for (const auto& entry : kv)
      if (std::find(keys.begin(), keys.end(), entry.first) == keys.end())
        fail(path, "config: unknown key '" + entry.first + "'");
  KvCacheConfig c;
  c.preset = kv["preset"];
  c.n_layers = int(parse_int(path, "n_layers", kv["n_layers"], 1, 4096));
  c.n_heads_kv = int(parse_int(path, "n_heads_kv", kv["n_heads_kv"], 1, 1024));
  c.head_dim = int(parse_int(path, "head_dim", kv["head_dim"], 1, 1 << 20));
  c.page_tokens = int(parse_int(path, "page_tokens", kv["page_tokens"], 1, 65536));
  c.dense_window = int(parse_int(path, "dense_window", kv["dense_window"], 0, INT32_MAX));
  if (version >= 3) c.dense_prefix = int(parse_int(path, "dense_prefix", kv["dense_prefix"], 0, INT32_MAX));
  c.k_start = int(parse_int(path, "k_start", kv["k_start"], 0, INT32_MAX));
  {
    const std::string& v = kv["seed"];
    const auto r = std::from_chars(v.data(), v.data() + v.size(), c.seed);
    if (v.empty() || r.ec != std::errc() || r.ptr != v.data() + v.size())
      fail(path, "config: seed='" + v + "' is not a 64-bit unsigned integer");
  }
  for (auto [key, f] : {std::pair{"k_format", &c.k_format}, std::pair{"v_format", &c.v_format},
                        std::pair{"dense_format", &c.dense_format}}) {
    try {
      *f = parse_format(kv[key]);
    } catch (const Error& e) {
      fail(path, std::string("config: ") + key + ": " + e.what());
    }
  }
  const std::string& dl = kv["dense_layers"];
  for (size_t p = 0; p < dl.size();) {
    size_t comma = dl.find(',', p);
    if (comma == std::string::npos) comma = dl.size();
    c.dense_layers.push_back(int(parse_int(path, "dense_layers", dl.substr(p, comma - p), 0, 4095)));
    p = comma + 1;
    if (comma + 1 == dl.size()) fail(path, "config: dense_layers ends with a comma");
  }
  if (version >= 4 && !kv["layer_formats"].empty()) {
    try {
      c.layer_formats = parse_layer_formats(kv["layer_formats"], c.n_layers);
    } catch (const Error& e) {
      fail(path, std::string("config: layer_formats: ") + e.what());
    }
  }
  if (version >= 5) {
    const std::string& sw = kv["sliding_window"];
    for (size_t p = 0; p < sw.size();) {
      size_t comma = sw.find(',', p);
      if (comma == std::string::npos) comma = sw.size();
      c.sliding_window.push_back(int(parse_int(path, "sliding_window", sw.substr(p, comma - p), 0, INT32_MAX)));
      p = comma + 1;
      if (comma + 1 == sw.size()) fail(path, "config: sliding_window ends with a comma");
    }
  }
  try {
    c.validate();
  } catch (const Error& e) {
    fail(path, std::string("config: ") + e.what());
  }
  return c;
}

// Checks the fixed header, the sizes and the header checksum and parses the
// config. data: the first `avail` bytes of a file of `file_bytes` bytes;
// avail >= min(file_bytes, what the header needs).
Header parse_header(const std::string& path, const uint8_t* data, size_t avail, size_t file_bytes) {
  if (avail >= 4 && std::memcmp(data, kMagic, 4) != 0)
    fail(path, "bad magic (expected \"TQKV\"): not a saved KV cache");
  if (file_bytes < kFileHeaderBytes)
    fail(path, "file truncated at byte " + std::to_string(file_bytes) + " (expected at least " +
                   std::to_string(kFileHeaderBytes) + " header bytes)");
  const uint32_t version = get_u32(data + 4);
  if (version < 1 || version > kVersion)
    fail(path, "unsupported version " + std::to_string(version) + " (this build reads versions 1 to " +
                   std::to_string(kVersion) + ")");
  const uint32_t header_len = get_u32(data + 8), flags = get_u32(data + 12);
  if (flags != 0) fail(path, "unsupported header flags " + std::to_string(flags) + " (expected 0)");
  Header h;
  h.version = version;
  h.file_size = get_u64(data + 16);
  if (file_bytes < h.file_size)
    fail(path, "file truncated at byte " + std::to_string(file_bytes) + " (expected " +
                   std::to_string(h.file_size) + ")");
  if (file_bytes > h.file_size)
    fail(path, std::to_string(file_bytes - h.file_size) + " unexpected bytes after byte " +
                   std::to_string(h.file_size) + " (the header gives the file size " +
                   std::to_string(h.file_size) + ")");
  if (header_len > kMaxHeaderLen ||
      kFileHeaderBytes + header_len + 8 + 4 + 8 > h.file_size)
    fail(path, "corrupt: header length " + std::to_string(header_len) +
                   " does not fit a file of " + std::to_string(h.file_size) + " bytes");
  h.body_offset = kFileHeaderBytes + header_len + 8;
  if (avail < h.body_offset)  // read_config reads the header twice; the file changed between
    fail(path, "changed while being read");
  const uint64_t stored = get_u64(data + kFileHeaderBytes + header_len);
  const uint64_t computed = fnv1a(kFnvOffset, data, kFileHeaderBytes + header_len);
  if (stored != computed)
    fail(path, "header checksum mismatch (stored " + hex64(stored) + ", computed " + hex64(computed) +
                   "): the file is corrupted");
  h.cfg = parse_config(path, std::string(reinterpret_cast<const char*>(data) + kFileHeaderBytes,
                                         header_len), version);
  return h;
}

struct File {
  std::FILE* f;
  explicit File(std::FILE* x) : f(x) {}
  ~File() {
    if (f) std::fclose(f);
  }
};

std::vector<uint8_t> read_prefix(const std::string& path, size_t max_bytes, size_t* file_bytes) {
  File in(std::fopen(path.c_str(), "rb"));
  if (!in.f) TQ_THROW("KV cache file '", path, "': cannot open for reading: ", std::strerror(errno));
  if (std::fseek(in.f, 0, SEEK_END) != 0) TQ_THROW("KV cache file '", path, "': cannot seek");
  const long size = std::ftell(in.f);
  if (size < 0) TQ_THROW("KV cache file '", path, "': cannot tell its size");
  std::rewind(in.f);
  *file_bytes = size_t(size);
  std::vector<uint8_t> data(std::min(size_t(size), max_bytes));
  if (std::fread(data.data(), 1, data.size(), in.f) != data.size())
    TQ_THROW("KV cache file '", path, "': read error: ", std::strerror(errno));
  return data;
}

// The first field in which two configs differ (empty: equal). The preset name
// is a label only: every field that shapes storage is compared.
std::string config_mismatch(const KvCacheConfig& f, const KvCacheConfig& c) {
  auto num = [](const char* name, auto a, auto b) {
    return a == b ? std::string()
                  : std::string(name) + " file " + std::to_string(a) + " vs cache " + std::to_string(b);
  };
  for (std::string m : {num("n_layers", f.n_layers, c.n_layers), num("n_heads_kv", f.n_heads_kv, c.n_heads_kv),
                        num("head_dim", f.head_dim, c.head_dim), num("page_tokens", f.page_tokens, c.page_tokens),
                        num("dense_window", f.dense_window, c.dense_window),
                        num("dense_prefix", f.dense_prefix, c.dense_prefix),
                        num("k_start", f.k_start, c.k_start), num("seed", f.seed, c.seed)})
    if (!m.empty()) return m;
  for (auto [name, a, b] : {std::tuple{"k_format", &f.k_format, &c.k_format},
                            std::tuple{"v_format", &f.v_format, &c.v_format},
                            std::tuple{"dense_format", &f.dense_format, &c.dense_format}})
    if (!(*a == *b))
      return std::string(name) + " file '" + to_string(*a) + "' vs cache '" + to_string(*b) + "'";
  const std::set<int> fl(f.dense_layers.begin(), f.dense_layers.end());
  const std::set<int> cl(c.dense_layers.begin(), c.dense_layers.end());
  if (fl != cl) {
    auto list = [](const std::set<int>& s) {
      std::string r = "[";
      for (int x : s) {
        if (r.size() > 1) r += ',';
        r += std::to_string(x);
      }
      return r + "]";
    };
    return "dense_layers file " + list(fl) + " vs cache " + list(cl);
  }
  for (int l = 0; l < c.n_layers; ++l) {  // no entry = 0 (keeps every token)
    auto w = [l](const KvCacheConfig& x) { return x.sliding_window.empty() ? 0 : x.sliding_window[size_t(l)]; };
    if (w(f) != w(c))
      return "sliding_window of layer " + std::to_string(l) + " file " + std::to_string(w(f)) + " vs cache " +
             std::to_string(w(c));
  }
  const std::string flf = layer_formats_text(f.layer_formats), clf = layer_formats_text(c.layer_formats);
  if (flf != clf) {
    auto show = [](const std::string& t) { return t.empty() ? std::string("none") : "'" + t + "'"; };
    return "layer_formats file " + show(flf) + " vs cache " + show(clf);
  }
  return {};
}

double micros_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// ---- save / load / read_config ---------------------------------------------

void KvCache::save(const std::string& path) const {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string text = config_text(cfg_);
  // pid + a counter: saves from several processes or threads never share a
  // temporary file.
  static std::atomic<unsigned> n_saves{0};
  const std::string tmp =
      path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(n_saves.fetch_add(1));
  {
    std::shared_lock lk(impl_->seq_mutex);
    Out count;
    write_file(count, *impl_, text, 0);
    // Until the rename, any failure (an exception included) closes and
    // removes the temporary file; the target is only ever replaced by a
    // complete, synced file.
    struct TmpFile {
      const std::string& name;
      std::FILE* f = nullptr;
      bool renamed = false;
      ~TmpFile() {
        if (f) std::fclose(f);
        if (!renamed) std::remove(name.c_str());
      }
    } t{tmp};
    t.f = std::fopen(tmp.c_str(), "wb");
    if (!t.f)
      TQ_THROW("KV cache save: cannot create the temporary file '", tmp, "': ", std::strerror(errno),
               " ('", path, "' is unchanged)");
    auto fail_write = [&](const char* what, int err) {
      TQ_THROW("KV cache save: ", what, " '", tmp, "' failed: ", std::strerror(err), " ('", path,
               "' is unchanged)");
    };
    Out o(t.f);
    write_file(o, *impl_, text, count.size());
    o.flush();
    TQ_ASSERT(o.size() == count.size());
    if (!o.ok() || std::ferror(t.f)) fail_write("writing", errno ? errno : EIO);
    if (std::fflush(t.f) != 0) fail_write("writing", errno);
    if (::fsync(::fileno(t.f)) != 0 && errno != EINVAL) fail_write("syncing", errno);
    const int rc = std::fclose(t.f);
    t.f = nullptr;
    if (rc != 0) fail_write("closing", errno);
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
      TQ_THROW("KV cache save: cannot rename '", tmp, "' to '", path, "': ", std::strerror(errno),
               " ('", path, "' is unchanged)");
    t.renamed = true;
  }
  // Make the rename itself durable (best effort: not every file system syncs directories).
  {
    const size_t slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
      (void)::fsync(fd);
      ::close(fd);
    }
  }
  if (impl_->events_on()) {
    const size_t bytes = bytes_allocated();
    impl_->emit("save", -1, -1, memory().tokens, bytes, bytes, micros_since(t0));
  }
}

KvCacheConfig KvCache::read_config(const std::string& path) {
  size_t file_bytes = 0;
  std::vector<uint8_t> data = read_prefix(path, kFileHeaderBytes, &file_bytes);
  if (data.size() >= kFileHeaderBytes) {
    const uint32_t header_len = get_u32(data.data() + 8);
    if (header_len <= kMaxHeaderLen)
      data = read_prefix(path, kFileHeaderBytes + header_len + 8, &file_bytes);
  }
  // parse_header checks header_len against the file size before it reads the
  // config, so data always holds what it reads.
  return parse_header(path, data.data(), data.size(), file_bytes).cfg;
}

void KvCache::load(const std::string& path) {
  const auto t0 = std::chrono::steady_clock::now();
  const size_t bytes_before = bytes_allocated();
  size_t file_bytes = 0;
  const std::vector<uint8_t> data = read_prefix(path, SIZE_MAX, &file_bytes);
  TQ_REQUIRE(data.size() == file_bytes, "KV cache file '", path, "': changed while being read");
  const Header h = parse_header(path, data.data(), data.size(), file_bytes);
  const size_t end = data.size() - 8;
  const uint64_t stored = get_u64(data.data() + end), computed = fnv1a(kFnvOffset, data.data(), end);
  if (stored != computed)
    fail(path, "checksum mismatch (stored " + hex64(stored) + ", computed " + hex64(computed) +
                   "): the file is corrupted");
  const std::string mismatch = config_mismatch(h.cfg, cfg_);
  if (!mismatch.empty()) fail(path, "config mismatch: " + mismatch + " (the cache is unchanged)");

  // Build the new sequences aside; they count against the cache's allocator
  // from the start, and release it again if anything below throws.
  const int H = cfg_.n_heads_kv, W = cfg_.dense_window, P = cfg_.page_tokens, S = cfg_.dense_prefix;
  const size_t db = impl_->db();
  Reader r(path, data.data(), end, h.body_offset);
  // Outlier channels: built aside, swapped in with the sequences.
  struct Calib {
    bool on = false;
    std::vector<std::vector<int>> k_hi, v_hi;
    std::vector<std::unique_ptr<Quantizer>> kq, vq;
  };
  std::vector<Calib> calib(cfg_.n_layers);
  for (int l = 0; l < cfg_.n_layers; ++l) {
    Calib& c = calib[l];
    if (h.version == 1) {  // encoded with the default channels: keep them for good
      c.on = true;
      continue;
    }
    const uint8_t on = r.u8("outlier-channel flag");
    if (on > 1)
      fail(path, "corrupt: layer " + std::to_string(l) + " outlier-channel flag " + std::to_string(on));
    c.on = on;
    if (!on) continue;
    for (int key = 1; key >= 0; --key) {
      const FormatSpec& f = key ? cfg_.k_format_of(l) : cfg_.v_format_of(l);
      if (!is_split(f)) continue;
      const int count = channel_split(f, cfg_.head_dim).hi_channels;
      for (int hh = 0; hh < H; ++hh) {
        std::vector<int> hi(count);
        for (int& ch : hi) ch = r.u16("outlier channel");
        for (int i = 0; i < count; ++i)
          if (hi[i] >= cfg_.head_dim || (i > 0 && hi[i] <= hi[i - 1]))
            fail(path, "corrupt: layer " + std::to_string(l) + " head " + std::to_string(hh) + " " +
                           (key ? "K" : "V") + " outlier channels are not ascending indices below " +
                           std::to_string(cfg_.head_dim));
        (key ? c.kq : c.vq).push_back(impl_->head_quantizer(l, key, hi));
        (key ? c.k_hi : c.v_hi).push_back(std::move(hi));
      }
    }
  }
  const uint32_t n_slots = r.u32("sequence count");
  if (n_slots > r.remaining())
    fail(path, "corrupt: " + std::to_string(n_slots) + " sequences cannot fit in " +
                   std::to_string(r.remaining()) + " bytes");
  std::vector<std::unique_ptr<Sequence>> seqs(n_slots);
  for (uint32_t id = 0; id < n_slots; ++id) {
    const uint8_t live = r.u8("sequence flag");
    if (live > 1) fail(path, "corrupt: sequence " + std::to_string(id) + " flag " + std::to_string(live));
    if (!live) continue;
    auto sq = std::make_unique<Sequence>();
    sq->layers.resize(cfg_.n_layers);
    for (int l = 0; l < cfg_.n_layers; ++l) {
      const std::string where = "sequence " + std::to_string(id) + " layer " + std::to_string(l);
      SeqLayer& s = sq->layers[l];
      const uint8_t flags = r.u8("layer flags");
      const uint8_t* zero = r.take(3, "layer header");
      const uint32_t n_main = r.u32("n_main"), win_start = r.u32("win_start"),
                     win_count = r.u32("win_count");
      const uint32_t n_pre = h.version >= 3 ? r.u32("n_pre") : 0;
      const uint32_t n_evicted = h.version >= 5 ? r.u32("n_evicted") : 0;
      if ((flags & ~(kFlagCompressed | kFlagWindow | kFlagPrefix | kFlagPrefixEvicted)) || zero[0] || zero[1] ||
          zero[2] || (h.version < 5 && (flags & kFlagPrefixEvicted)))
        fail(path, "corrupt: " + where + ": unknown layer flags");
      const bool prefix = flags & kFlagPrefix;
      const bool pre_evicted = flags & kFlagPrefixEvicted;
      // Eviction only in a sliding-window layer, whole pages, the prefix first.
      if ((n_evicted > 0 || pre_evicted) &&
          (impl_->window_of(l) == 0 || n_evicted > n_main || n_evicted % uint32_t(P) != 0 ||
           (pre_evicted && (prefix || S == 0 || n_pre != uint32_t(S))) || (n_evicted > 0 && S > 0 && !pre_evicted)))
        fail(path, "corrupt: " + where + ": " + std::to_string(n_evicted) + " evicted main tokens" +
                       (pre_evicted ? " and an evicted prefix" : "") + " with " + std::to_string(n_main) +
                       " main tokens, pages of " + std::to_string(P) + ", a dense prefix of " +
                       std::to_string(n_pre) + " / " + std::to_string(S) + " and sliding window " +
                       std::to_string(impl_->window_of(l)));
      if (n_pre > uint32_t(S) || (n_pre > 0 && !prefix && !pre_evicted) || (S == 0 && prefix) ||
          (n_pre < uint32_t(S) && (n_main > 0 || win_count > 0)))
        fail(path, "corrupt: " + where + ": dense prefix of " + std::to_string(n_pre) + " tokens" +
                       (prefix ? " (allocated)" : " (not allocated)") + " with dense_prefix " +
                       std::to_string(S) + ", " + std::to_string(n_main) + " main and " +
                       std::to_string(win_count) + " window tokens");
      s.compressed = flags & kFlagCompressed;
      const bool window = flags & kFlagWindow;
      if (s.compressed && impl_->layers[l].dense_policy)
        fail(path, "corrupt: " + where + " is compressed but the layer policy keeps it dense");
      if (n_main > uint32_t(INT32_MAX) || win_count > uint32_t(W) ||
          win_start >= uint32_t(std::max(W, 1)) || (win_count > 0 && !window) || (W == 0 && window))
        fail(path, "corrupt: " + where + ": n_main " + std::to_string(n_main) + ", window start " +
                       std::to_string(win_start) + " count " + std::to_string(win_count) +
                       (window ? " (allocated)" : " (not allocated)") + " with a dense window of " +
                       std::to_string(W));
      const size_t kb = impl_->main_k(l, s.compressed).bytes_per_vector();
      const size_t vb = impl_->main_v(l, s.compressed).bytes_per_vector();
      // Size check before any allocation: a corrupt count cannot ask for memory.
      const size_t need = size_t(n_main - n_evicted) * H * (kb + vb) +
                          (size_t(win_count) + (pre_evicted ? 0 : n_pre)) * H * db * 2;
      if (need > r.remaining())
        fail(path, "corrupt: " + where + " needs " + std::to_string(need) + " record bytes at byte " +
                       std::to_string(r.pos()) + " but only " + std::to_string(r.remaining()) +
                       " remain");
      s.n_main = int(n_main);
      s.win_start = int(win_start);
      s.win_count = int(win_count);
      s.n_pre = int(n_pre);
      s.n_evicted = int(n_evicted);
      s.pre_evicted = pre_evicted;
      if (prefix) {
        s.pre_k = Buffer(size_t(S) * H * db, &impl_->allocated);
        s.pre_v = Buffer(size_t(S) * H * db, &impl_->allocated);
      }
      if (prefix)
        for (Buffer* b : {&s.pre_k, &s.pre_v})
          for (int t = 0; t < s.n_pre; ++t)
            for (int h2 = 0; h2 < H; ++h2)
              std::memcpy(impl_->pre_rec(*b, h2, t), r.take(db, "prefix records"), db);
      s.pages.resize(size_t(s.n_evicted / P));  // freed pages stay empty
      for (int p = s.n_evicted / P; p < (s.n_main + P - 1) / P; ++p)
        s.pages.emplace_back(impl_->page_bytes(kb, vb), &impl_->allocated);
      for (int t = s.n_evicted; t < s.n_main; ++t)
        for (int h2 = 0; h2 < H; ++h2) std::memcpy(impl_->k_rec(s, kb, h2, t), r.take(kb, "K records"), kb);
      for (int t = s.n_evicted; t < s.n_main; ++t)
        for (int h2 = 0; h2 < H; ++h2)
          std::memcpy(impl_->v_rec(s, kb, vb, h2, t), r.take(vb, "V records"), vb);
      if (window) {
        s.win_k = Buffer(size_t(W) * H * db, &impl_->allocated);
        s.win_v = Buffer(size_t(W) * H * db, &impl_->allocated);
      }
      for (Buffer* b : {&s.win_k, &s.win_v})
        for (int i = 0; i < s.win_count; ++i)
          for (int h2 = 0; h2 < H; ++h2)
            std::memcpy(impl_->win_rec(*b, h2, (s.win_start + i) % W), r.take(db, "window records"), db);
    }
    seqs[id] = std::move(sq);
  }
  if (r.remaining() != 0)
    fail(path, "corrupt: " + std::to_string(r.remaining()) + " bytes left over before the checksum");

  {
    std::unique_lock lk(impl_->seq_mutex);
    std::lock_guard ck(impl_->calib_mutex);
    impl_->seqs.swap(seqs);
    for (int l = 0; l < cfg_.n_layers; ++l) {
      auto& L = impl_->layers[l];
      L.kq_head = std::move(calib[l].kq);
      L.vq_head = std::move(calib[l].vq);
      L.k_hi = std::move(calib[l].k_hi);
      L.v_hi = std::move(calib[l].v_hi);
      impl_->calibrated[l].store(calib[l].on, std::memory_order_release);
    }
  }
  seqs.clear();  // the old sequences, released outside the lock
  if (impl_->events_on())
    impl_->emit("load", -1, -1, memory().tokens, bytes_before, bytes_allocated(), micros_since(t0));
}

// ---- Events -----------------------------------------------------------------

void KvCache::Impl::emit(const char* event, int seq, int layer, size_t tokens, size_t bytes_before,
                         size_t bytes_after, double us) {
  const double bf16 = double(tokens) * cfg.n_heads_kv * cfg.head_dim * 2 * 2;  // K + V
  const double ratio = bytes_after ? bf16 / double(bytes_after) : 0.0;
  char line[320];
  std::snprintf(line, sizeof line,
                "{\"event\":\"%s\",\"seq\":%d,\"layer\":%d,\"tokens\":%zu,\"bytes_before\":%zu,"
                "\"bytes_after\":%zu,\"ratio\":%.6g,\"us\":%.1f}",
                event, seq, layer, tokens, bytes_before, bytes_after, ratio, us);
  std::lock_guard lk(sink_mutex);
  if (!sink) return;
  // Events report on an operation that has already completed; a failing sink
  // must not turn that into an error (the cache's "unchanged on error"
  // promise would be a lie), so its exceptions stop here.
  try {
    sink(line);
  } catch (...) {
  }
}

void KvCache::set_event_sink(EventSink sink) {
  std::lock_guard lk(impl_->sink_mutex);
  impl_->sink = std::move(sink);
  impl_->has_sink.store(static_cast<bool>(impl_->sink));
}

KvCache::EventSink KvCache::file_sink(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (!f) TQ_THROW("event sink: cannot open '", path, "' for appending: ", std::strerror(errno));
  struct State {
    std::FILE* f;
    std::mutex m;
    ~State() { std::fclose(f); }
  };
  auto st = std::make_shared<State>();
  st->f = f;
  // One whole line per write, flushed, so a reader (or a crash) sees whole lines.
  return [st](const std::string& line) {
    std::lock_guard lk(st->m);
    std::fputs(line.c_str(), st->f);
    std::fputc('\n', st->f);
    std::fflush(st->f);
  };
}

}  // namespace tq
