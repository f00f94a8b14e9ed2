// tq gpu-bench (issue 5): GPU decode attention on packed codes (GpuKvLayer)
// against our dense bf16 kernel (dense_decode_bf16) and, given the JSON of
// scripts/sdpa_bench.py, PyTorch SDPA, on one layer of Llama-3-8B
// (Hq 32, Hkv 8, d 128) and Gemma-3 (Hq 4, Hkv 1, d 256).
//
// Every time is the median of --runs launches between CUDA events, each after
// an L2 flush (a read of a buffer > 4x the L2, so that no dirty line's
// write-back falls in the timed region; scripts/sdpa_bench.py flushes the
// same way). Bandwidth is the bytes a kernel must read (the K/V records of
// every visible token and the queries) over that time, reported as a share of
// a device-to-device copy (read + write counted, as REFERENCE.md does) and of
// a pure read stream, both measured in the same process, and against the
// read floor: the fastest pure read of exactly that many bytes (several
// access patterns, cuda_bench.hpp) timed the same way, fixed costs included,
// which bounds what any kernel could reach (max_speedup_vs_sdpa). Also timed: the
// quantize-append of a 131072-token prefill block of each --shape, from
// bf16 and from f32 input (kernels alone, and the whole append_device call),
// against one read of the same block in bf16, and one decode step's append
// (one token for each sequence of a batch, append_batch_device), wall time
// per call. Each tensor-core attend row also times the attend captured in a
// CUDA graph before the sequences were filled (sequence 0 held its first
// chunk of 16K tokens, the others nothing; graph_ms: splits planned on the
// device at each replay, the default under capture;
// graph_frozen_plan_ms: the host's plan frozen at capture) and, outside a
// graph, with the device plan forced (device_plan_ms: its in-kernel cost),
// those and a host-planned call (captured_host_ms) timed interleaved.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cli_util.hpp"
#include "commands.hpp"
#include "turboquant/cuda.hpp"
#include "turboquant/cuda_bench.hpp"
#include "turboquant/error.hpp"
#include "turboquant/half.hpp"
#include "turboquant/kv_cache.hpp"
#include "turboquant/quantizer.hpp"

namespace tq::cli {
namespace {

namespace cb = tq::cuda::bench;
using nlohmann::json;

constexpr const char* kDense = "dense_bf16";

struct Shape {
  std::string name;
  int n_heads_q, n_heads_kv, head_dim;
};
const std::vector<Shape> kShapes = {{"llama", 32, 8, 128}, {"gemma", 4, 1, 256}};

struct Args {
  std::string shapes = "llama,gemma";
  std::string batches = "1,8,32";
  std::string contexts = "4096,32768,131072";
  std::string presets = "turbo4,paper_mse,turbo3,turbo2.5";
  int runs = 30;
  int page_tokens = 256;
  int split_pages = 0;       // 0: enough splits to fill the device
  int append_tokens = 131072;
  int append_runs = 10;
  int dense_window = 0, dense_prefix = 0;  // the layer's dense tokens (GpuKvLayerConfig)
  int window = 0;            // sliding-window attention (AttentionParams::window); 0: none
  std::string io = "f32";    // element type of the compressed attend's query and output
  bool no_append = false;
  uint64_t seed = 1;
  bool json_out = false;
  std::string json_file;
  std::string sdpa_file;
};

double gib(double bytes) { return bytes / double(1ull << 30); }

// Median ms of `runs` launches on `stream`, each after an L2 flush, after 3
// warm-ups.
template <class F>
double time_median(F&& launch, int runs, cb::L2Flusher& flush, cuda::Stream stream = nullptr) {
  for (int i = 0; i < 3; ++i) launch();
  cb::synchronize(stream);
  cb::EventTimer timer(runs);
  for (int i = 0; i < runs; ++i) {
    flush.flush(stream);
    timer.start(i, stream);
    launch();
    timer.stop(i, stream);
  }
  return timer.median_ms();
}

// A launch and the stream it is ordered on.
struct Timed {
  std::function<void()> launch;
  cuda::Stream stream = nullptr;
};

// Median ms of each of `cases`, timed interleaved (run i of every case, then
// run i + 1): at long launches the board's power limit lowers the clock
// through a sequence of runs, which favours whatever is timed first.
std::vector<double> time_interleaved(const std::vector<Timed>& cases, int runs, cb::L2Flusher& flush) {
  for (const Timed& c : cases) {
    for (int i = 0; i < 3; ++i) c.launch();
    cb::synchronize(c.stream);
  }
  std::vector<std::unique_ptr<cb::EventTimer>> timers;
  for (size_t k = 0; k < cases.size(); ++k) timers.push_back(std::make_unique<cb::EventTimer>(runs));
  for (int i = 0; i < runs; ++i)
    for (size_t k = 0; k < cases.size(); ++k) {
      flush.flush(cases[k].stream);
      timers[k]->start(i, cases[k].stream);
      cases[k].launch();
      timers[k]->stop(i, cases[k].stream);
      cb::synchronize(cases[k].stream);  // the next case runs on another stream
    }
  std::vector<double> ms;
  for (const auto& t : timers) ms.push_back(t->median_ms());
  return ms;
}

struct Ceilings {
  double copy_tb_s = 0, read_tb_s = 0;
  std::vector<std::pair<std::string, double>> floor_tb_s;  // each read-floor variant at 1 GiB
};

Ceilings measure_ceilings(int runs, cb::L2Flusher& flush) {
  const size_t bytes = size_t(1) << 30;  // >> L2: the flush hardly matters here
  cuda::DeviceBuffer a(bytes), b(bytes), sink(sizeof(float));
  cb::fill_normal_bf16(a.as<uint16_t>(), bytes / 2, 7, 0.0f, 1.0f, nullptr);
  Ceilings c;
  const double copy_ms = time_median([&] { cb::copy_d2d(b.data(), a.data(), bytes, nullptr); }, runs, flush);
  c.copy_tb_s = 2.0 * double(bytes) / (copy_ms * 1e-3) / 1e12;
  const double read_ms =
      time_median([&] { cb::read_sum_bf16(a.data(), bytes, sink.as<float>(), nullptr); }, runs, flush);
  c.read_tb_s = double(bytes) / (read_ms * 1e-3) / 1e12;
  for (int v = 0; v < cb::kReadFloorVariants; ++v) {
    if (!cb::read_floor_supported(v)) continue;
    const double ms = time_median(
        [&] { cb::read_floor(a.data(), bytes, reinterpret_cast<unsigned*>(sink.data()), v, nullptr); }, runs, flush);
    c.floor_tb_s.emplace_back(cb::read_floor_name(v), double(bytes) / (ms * 1e-3) / 1e12);
  }
  return c;
}

// Does the GPU layer take this preset at this head_dim? The error text if not.
std::optional<std::string> gpu_unsupported(const KvPreset& p, int head_dim, int n_heads_kv) {
  try {
    auto kq = make_quantizer(p.k_spec, head_dim, 1), vq = make_quantizer(p.v_spec, head_dim, 2);
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = n_heads_kv;
    cfg.page_tokens = 16;
    cfg.max_pages_per_seq = 1;
    cuda::GpuKvLayer probe(*kq, *vq, cfg);
    return std::nullopt;
  } catch (const Error& e) {
    return std::string(e.what());
  }
}

struct SdpaBest {
  double ms = 0;
  std::string backend;
};
using SdpaKey = std::tuple<std::string, int, int>;  // shape, batch, context

std::map<SdpaKey, SdpaBest> load_sdpa(const std::string& path) {
  std::ifstream in(path);
  TQ_REQUIRE(in.good(), "gpu-bench --sdpa: cannot open '", path, "'");
  json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    TQ_THROW("gpu-bench --sdpa: '", path, "' is not JSON (", e.what(), ")");
  }
  TQ_REQUIRE(j.is_object() && j.contains("best") && j["best"].is_array(), "gpu-bench --sdpa: '",
             path, "' has no \"best\" array (expected the output of scripts/sdpa_bench.py)");
  std::map<SdpaKey, SdpaBest> m;
  for (const auto& r : j["best"]) {
    TQ_REQUIRE(r.contains("shape") && r.contains("batch") && r.contains("context") && r.contains("ms"),
               "gpu-bench --sdpa: an entry of \"best\" in '", path, "' lacks shape/batch/context/ms");
    m[{r["shape"].get<std::string>(), r["batch"].get<int>(), r["context"].get<int>()}] =
        SdpaBest{r["ms"].get<double>(), r.value("backend", std::string("?"))};
  }
  return m;
}

class Bench {
 public:
  explicit Bench(const Args& a) : a_(a) {}

  int run() {
    for (const auto& s : split_list(a_.shapes)) {
      auto it = std::find_if(kShapes.begin(), kShapes.end(), [&](const Shape& x) { return x.name == s; });
      TQ_REQUIRE(it != kShapes.end(), "gpu-bench --shape: '", s, "' is not a shape (expected llama or gemma)");
      shapes_.push_back(*it);
    }
    batches_ = parse_int_list("--batch", a_.batches);
    contexts_ = parse_int_list("--context", a_.contexts);
    for (int b : batches_) TQ_REQUIRE(b >= 1 && b <= 4096, "--batch: ", b, " is outside 1..4096");
    for (int c : contexts_) TQ_REQUIRE(c >= 1 && c <= (1 << 24), "--context: ", c, " is outside 1..16777216");
    for (const auto& p : split_presets(a_.presets)) {
      // One layer per run: a layer policy would have nothing to choose from.
      TQ_REQUIRE(p.find('+') == std::string::npos, "--preset '", p,
                 "': gpu-bench times one layer, so a layer policy (+LAYERS=PRESET) does not apply");
      if (p != kDense) presets_.push_back(find_kv_preset(p));  // unknown names fail here
    }
    if (!a_.sdpa_file.empty()) sdpa_ = load_sdpa(a_.sdpa_file);
    // Arguments first: a bad flag is reported the same with or without a GPU.
    TQ_REQUIRE(cb::built_with_cuda(),
               "gpu-bench: tq was built without CUDA (configure with -DTQ_CUDA=ON on a machine with nvcc)");
    TQ_REQUIRE(cuda::cuda_available(), "gpu-bench: no GPU: no CUDA device is visible to this process");

    const cb::DeviceInfo dev = cb::device_info();
    flush_ = std::make_unique<cb::L2Flusher>();
    ceil_ = measure_ceilings(std::max(a_.runs, 10), *flush_);
    sm_count_ = dev.sm_count;
    std::string floors;
    json floor_j = json::object();
    for (const auto& [name, tb] : ceil_.floor_tb_s) {
      floors += fmt(" %s %.2f", name.c_str(), tb);
      floor_j[name] = tb;
    }
    info("gpu-bench: %s, %d SMs, L2 %.0f MiB, %.1f GiB free; copy %.2f TB/s (read + write), read %.2f TB/s;"
         " read-floor variants at 1 GiB (TB/s):%s",
         dev.name.c_str(), dev.sm_count, dev.l2_bytes / 1048576.0, gib(dev.free_bytes), ceil_.copy_tb_s,
         ceil_.read_tb_s, floors.c_str());
    rows_.push_back({{"kind", "device"}, {"device", dev.name}, {"sm_count", dev.sm_count},
                     {"l2_bytes", dev.l2_bytes}, {"total_bytes", dev.total_bytes},
                     {"copy_tb_s", ceil_.copy_tb_s}, {"read_tb_s", ceil_.read_tb_s},
                     {"read_floor_tb_s", floor_j}, {"runs", a_.runs}, {"l2_flush_bytes", flush_->bytes()}});
    if (!a_.json_out) {
      std::printf("device %s: copy %.2f TB/s (read + write), read stream %.2f TB/s, read-floor variants at 1 GiB"
                  " (TB/s):%s; medians of %d runs, L2 flushed\n",
                  dev.name.c_str(), ceil_.copy_tb_s, ceil_.read_tb_s, floors.c_str(), a_.runs);
      std::printf("floor_ms: the fastest pure read of the row's bytes in this harness; of_floor: floor_ms / ms;"
                  " max_sdpa: sdpa_ms / floor_ms, the most any kernel reading those bytes could show\n");
      std::printf("%-6s %5s %7s %-11s %9s %8s %6s %6s %6s %8s %8s %9s %9s %8s %8s\n", "shape", "batch", "context",
                  "preset", "ms", "GB", "TB/s", "copy%", "read%", "vs_dense", "vs_sdpa", "sdpa_ms", "floor_ms",
                  "of_floor", "max_sdpa");
    }
    for (const Shape& s : shapes_)
      for (int b : batches_)
        for (int c : contexts_) run_shape(s, b, c);
    if (!a_.no_append) {
      for (const Shape& s : shapes_) run_append(s);
      run_decode_append();
    }

    const json out(rows_);
    if (a_.json_out) std::printf("%s\n", out.dump(2).c_str());
    if (!a_.json_file.empty()) {
      const std::string tmp = a_.json_file + ".tmp";
      {
        std::ofstream f(tmp);
        TQ_REQUIRE(f.good(), "gpu-bench --json-file: cannot write '", tmp, "'");
        f << out.dump(2) << "\n";
        TQ_REQUIRE(f.good(), "gpu-bench --json-file: write to '", tmp, "' failed");
      }
      TQ_REQUIRE(std::rename(tmp.c_str(), a_.json_file.c_str()) == 0, "gpu-bench --json-file: cannot rename '",
                 tmp, "' to '", a_.json_file, "'");
    }
    return 0;
  }

 private:
  template <class... T>
  void info(const char* fmt, T... args) const {
    std::fprintf(stderr, fmt, args...);
    std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }

  size_t free_bytes() const { return cb::device_info().free_bytes; }

  json base_row(const Shape& s, int batch, int context, const std::string& preset) const {
    json r = {{"kind", "attend"},          {"shape", s.name},       {"n_heads_q", s.n_heads_q},
              {"n_heads_kv", s.n_heads_kv}, {"head_dim", s.head_dim}, {"batch", batch},
              {"context", context},          {"preset", preset}};
    if (a_.window > 0) {
      r["window"] = a_.window;
      r["visible_tokens"] = visible(context);
    }
    return r;
  }

  // The read floor of `bytes` (cuda_bench.hpp): the median time of the
  // fastest pure read of that many bytes, timed as every kernel here is.
  std::pair<double, std::string> read_floor_ms(double bytes_d) {
    const size_t bytes = size_t(bytes_d) / 16 * 16;
    const size_t grain = size_t(256) << 20;
    if (!floor_buf_ || floor_buf_->size() < bytes) {
      floor_buf_.reset();
      const size_t want = (bytes + grain - 1) / grain * grain;
      floor_buf_.emplace(want);
      cb::fill_normal_bf16(floor_buf_->as<uint16_t>(), want / 2, a_.seed * 17 + 5, 0.0f, 1.0f, nullptr);
    }
    if (!floor_sink_) floor_sink_.emplace(sizeof(unsigned));
    double best = INFINITY;
    std::string name;
    for (int v = 0; v < cb::kReadFloorVariants; ++v) {
      if (!cb::read_floor_supported(v)) continue;
      const double ms = time_median(
          [&] { cb::read_floor(floor_buf_->data(), bytes, floor_sink_->as<unsigned>(), v, nullptr); }, a_.runs,
          *flush_);
      if (ms < best) {
        best = ms;
        name = cb::read_floor_name(v);
      }
    }
    return {best, name};
  }

  // Tokens a query sees at this context (the whole context without --window).
  int visible(int context) const { return a_.window > 0 ? std::min(context, a_.window) : context; }

  // Fills ms / bytes / bandwidth / ratios of a timed row and prints it.
  void finish_row(json& r, double ms, double bytes) {
    const double tb_s = bytes / (ms * 1e-3) / 1e12;
    r["supported"] = true;
    r["ms"] = ms;
    r["bytes"] = bytes;
    r["tb_s"] = tb_s;
    r["copy_share"] = tb_s / ceil_.copy_tb_s;
    r["read_share"] = tb_s / ceil_.read_tb_s;
    const auto [floor_ms, floor_variant] = read_floor_ms(bytes);
    r["read_floor_ms"] = floor_ms;
    r["read_floor_variant"] = floor_variant;
    r["floor_share"] = floor_ms / ms;
    std::string vs_dense = "-", vs_sdpa = "-", sdpa_ms = "-", max_sdpa = "-";
    if (dense_ms_ > 0) {
      r["speedup_vs_dense_bf16"] = dense_ms_ / ms;
      vs_dense = fmt("%.2fx", dense_ms_ / ms);
    }
    // With --window, SDPA over the window's tokens (a dense engine attends a slice).
    auto it = sdpa_.find({r["shape"].get<std::string>(), r["batch"].get<int>(), visible(r["context"].get<int>())});
    if (it != sdpa_.end()) {
      r["sdpa_ms"] = it->second.ms;
      r["sdpa_backend"] = it->second.backend;
      r["speedup_vs_sdpa"] = it->second.ms / ms;
      vs_sdpa = fmt("%.2fx", it->second.ms / ms);
      sdpa_ms = fmt("%.4f", it->second.ms);
      r["max_speedup_vs_sdpa"] = it->second.ms / floor_ms;
      max_sdpa = fmt("%.2fx", it->second.ms / floor_ms);
    }
    // A compressed preset the tensor-core kernel cannot run says so.
    const bool ref = r.contains("decode_kernel") && r["decode_kernel"].get<std::string>().rfind("reference", 0) == 0;
    // Captured attends (graph_ms: splits planned on the device at each
    // replay; frozen: planned on the host at capture, early in the fill), with
    // a host-planned call, timed interleaved.
    const std::string graphs =
        r.contains("graph_ms")
            ? fmt("  interleaved: host %.4f, graph %.4f, frozen plan %.4f, device plan %.4f",
                  r["captured_host_ms"].get<double>(), r["graph_ms"].get<double>(),
                  r["graph_frozen_plan_ms"].get<double>(), r["device_plan_ms"].get<double>())
            : std::string();
    if (!a_.json_out)
      std::printf("%-6s %5d %7d %-11s %9.4f %8.3f %6.2f %5.0f%% %5.0f%% %8s %8s %9s %9.4f %7.0f%% %8s%s%s\n",
                  r["shape"].get<std::string>().c_str(), r["batch"].get<int>(), r["context"].get<int>(),
                  r["preset"].get<std::string>().c_str(), ms, bytes / 1e9, tb_s,
                  100 * tb_s / ceil_.copy_tb_s, 100 * tb_s / ceil_.read_tb_s, vs_dense.c_str(),
                  vs_sdpa.c_str(), sdpa_ms.c_str(), floor_ms, 100 * floor_ms / ms, max_sdpa.c_str(),
                  ref ? "  (reference kernel)" : "", graphs.c_str());
    std::fflush(stdout);
  }

  void note_row(json r, const std::string& key, const std::string& note) {
    r["supported"] = key != "unsupported";
    r[key == "unsupported" ? "note" : "skipped"] = note;
    if (!a_.json_out)
      std::printf("%-6s %5d %7d %-11s %s\n", r["shape"].get<std::string>().c_str(), r["batch"].get<int>(),
                  r["context"].get<int>(), r["preset"].get<std::string>().c_str(), note.c_str());
    rows_.push_back(std::move(r));
  }

  template <class... T>
  static std::string fmt(const char* f, T... args) {
    char buf[256];
    std::snprintf(buf, sizeof buf, f, args...);
    return buf;
  }

  void run_shape(const Shape& s, int batch, int context) {
    const int D = s.head_dim, Hq = s.n_heads_q, Hkv = s.n_heads_kv;
    const size_t q_bytes = size_t(batch) * Hq * D * sizeof(float);
    const double margin = 512.0 * (1 << 20);
    dense_ms_ = 0;
    info("gpu-bench: %s batch %d context %d", s.name.c_str(), batch, context);
    const int n_vis = visible(context);

    // ---- dense bf16 (the baseline: first, so the others get a ratio) ----
    // With --window it holds the window's tokens only (dense_decode_bf16 has
    // no window mask; a dense engine keeps or slices the window).
    {
      json r = base_row(s, batch, context, kDense);
      const size_t n = size_t(batch) * Hkv * size_t(n_vis) * D;
      const double need = 2.0 * n * 2 + 3.0 * q_bytes + margin;
      if (need > double(free_bytes())) {
        note_row(r, "skipped", fmt("skipped: needs %.1f GiB, %.1f GiB free", gib(need), gib(free_bytes())));
      } else {
        cuda::DeviceBuffer k(n * 2), v(n * 2), len(batch * sizeof(int)), q(q_bytes), out(q_bytes);
        cb::fill_normal_bf16(k.as<uint16_t>(), n, a_.seed * 11 + 1, 0.0f, 1.0f, nullptr);
        cb::fill_normal_bf16(v.as<uint16_t>(), n, a_.seed * 11 + 2, 0.0f, 1.0f, nullptr);
        cb::fill_normal_f32(q.as<float>(), q_bytes / 4, a_.seed * 11 + 3, 0.0f, 0.5f, nullptr);
        const std::vector<int> lens(batch, n_vis);
        len.upload(lens.data(), lens.size() * sizeof(int));
        cuda::DenseDecodeArgs da;
        da.batch = batch;
        da.n_heads_q = Hq;
        da.n_heads_kv = Hkv;
        da.head_dim = D;
        da.max_ctx = n_vis;
        da.k = k.as<uint16_t>();
        da.v = v.as<uint16_t>();
        da.lengths = len.as<int>();
        da.q = q.data();
        da.out = out.as<float>();
        const cuda::DenseDecodePlan plan = cuda::dense_decode_plan(da);
        cuda::DeviceBuffer ws(plan.workspace_bytes);
        const double ms = time_median(
            [&] { cuda::dense_decode_bf16(da, plan, ws.data(), ws.size(), nullptr); }, a_.runs, *flush_);
        r["n_splits"] = plan.n_splits;
        r["finite"] = all_finite(out, q_bytes / 4);
        dense_ms_ = ms;
        finish_row(r, ms, 2.0 * n * 2 + q_bytes);
        rows_.push_back(std::move(r));
      }
    }

    // ---- compressed presets on the GPU KV layer ----
    const int P = a_.page_tokens;
    const int pages = (context + P - 1) / P;
    const int chunk = std::min(context, 16384);
    std::optional<cuda::DeviceBuffer> kc, vc;  // fp32 [chunk, Hkv, D], appended over and over
    for (const KvPreset& pr : presets_) {
      json r = base_row(s, batch, context, pr.name);
      r["k_format"] = pr.k_spec;
      r["v_format"] = pr.v_spec;
      if (auto why = gpu_unsupported(pr, D, Hkv)) {
        note_row(r, "unsupported", "not supported on GPU yet: " + *why);
        continue;
      }
      auto kq = make_quantizer(pr.k_spec, D, a_.seed), vq = make_quantizer(pr.v_spec, D, a_.seed + 1);
      const size_t rec = kq->bytes_per_vector() + vq->bytes_per_vector();
      const double pool = double(batch) * pages * P * Hkv * rec;
      const double input = kc ? 0.0 : 2.0 * chunk * Hkv * D * sizeof(float);
      const double need = pool + input + 3.0 * q_bytes + double(batch) * Hq * (pages + 1) * (D + 1) * 4 + margin;
      if (need > double(free_bytes())) {
        note_row(r, "skipped", fmt("skipped: needs %.1f GiB, %.1f GiB free", gib(need), gib(free_bytes())));
        continue;
      }
      if (!kc) {
        kc.emplace(size_t(chunk) * Hkv * D * sizeof(float));
        vc.emplace(size_t(chunk) * Hkv * D * sizeof(float));
        cb::fill_normal_f32(kc->as<float>(), size_t(chunk) * Hkv * D, a_.seed * 13 + 1, 0.0f, 1.0f, nullptr);
        cb::fill_normal_f32(vc->as<float>(), size_t(chunk) * Hkv * D, a_.seed * 13 + 2, 0.0f, 1.0f, nullptr);
      }
      cuda::GpuKvLayerConfig cfg;
      cfg.n_heads_kv = Hkv;
      cfg.page_tokens = P;
      cfg.max_seqs = batch;
      cfg.max_pages_per_seq = pages;
      cfg.dense_window = a_.dense_window;
      cfg.dense_prefix = a_.dense_prefix;
      if (a_.split_pages > 0) {
        cfg.split_pages = a_.split_pages;
      } else {  // about 4 blocks per SM across (split, kv head, sequence)
        const long want = std::max(1L, (4L * sm_count_ + long(batch) * Hkv - 1) / (long(batch) * Hkv));
        cfg.split_pages = int(std::max(1L, (pages + want - 1) / want));
      }
      cuda::GpuKvLayer layer(*kq, *vq, cfg);
      for (int b = 0; b < batch; ++b) layer.add_sequence();
      // The query (and the output) in --io's type: the same values as f32
      // rounded to it.
      const cuda::DType io = io_dtype();
      const size_t io_bytes = q_bytes / 4 * cuda::dtype_bytes(io);
      cuda::DeviceBuffer q(io_bytes), out(io_bytes), ws(layer.workspace_bytes(Hq));
      fill_query(q, q_bytes / 4, io);
      AttentionParams ap;
      ap.window = a_.window;
      auto attend = [&](cuda::Stream st) {
        layer.attend(q.data(), io, Hq, ap, out.data(), io, nullptr, ws.data(), ws.size(), st);
      };
      // An engine's decode graph, captured early: when sequence 0 holds its
      // first chunk and the others nothing (a channel split chooses its hi
      // channels at the first append, and cannot attend before), with the
      // splits planned on the device at each replay (the default under
      // capture), and as a host plan would freeze them.
      layer.append_device(0, kc->as<float>(), vc->as<float>(), std::min(chunk, context), nullptr);
      cb::CapturedGraph graph, graph_frozen;
      const bool decode_tc = layer.attend_kernel(Hq) == "tensor_core";
      if (decode_tc) {
        attend(nullptr);  // (the per-device caches, outside the capture)
        cb::synchronize(nullptr);
        graph.begin_capture();
        attend(graph.stream());
        graph.end_capture();
        cuda::set_decode_split_planning(cuda::SplitPlanning::host);
        graph_frozen.begin_capture();
        attend(graph_frozen.stream());
        graph_frozen.end_capture();
        cuda::set_decode_split_planning(cuda::SplitPlanning::automatic);
      }
      const auto t0 = std::chrono::steady_clock::now();
      for (int b = 0; b < batch; ++b)
        for (int t = b == 0 ? chunk : 0; t < context; t += chunk)
          layer.append_device(b, kc->as<float>(), vc->as<float>(), std::min(chunk, context - t), nullptr);
      const double fill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double ms = time_median([&] { attend(nullptr); }, a_.runs, *flush_);
      if (decode_tc) {  // interleaved, with a host-planned call among them (captured_host_ms)
        const auto device_planned = [&] {
          cuda::set_decode_split_planning(cuda::SplitPlanning::device);
          attend(nullptr);
          cuda::set_decode_split_planning(cuda::SplitPlanning::automatic);
        };
        const std::vector<double> t = time_interleaved({{[&] { attend(nullptr); }, nullptr},
                                                        {[&] { graph.launch(); }, graph.stream()},
                                                        {[&] { graph_frozen.launch(); }, graph_frozen.stream()},
                                                        {device_planned, nullptr}},
                                                       a_.runs, *flush_);
        r["captured_host_ms"] = t[0];
        r["graph_ms"] = t[1];
        r["graph_frozen_plan_ms"] = t[2];
        r["device_plan_ms"] = t[3];
      }
      r["split_pages"] = cfg.split_pages;
      r["decode_kernel"] = layer.attend_kernel(Hq);
      r["page_tokens"] = P;
      r["record_bytes_per_token_head"] = rec;
      r["fill_s"] = fill_s;
      r["finite"] = all_finite(out, q_bytes / 4, io);
      r["io"] = cuda::to_string(io);
      r["dense_window"] = a_.dense_window;
      r["dense_prefix"] = a_.dense_prefix;
      // Dense tokens are read as f16 K and V rows (4 * D bytes per token and
      // head); with --window only the visible tokens count (the prefix is
      // outside a window shorter than the context).
      const double n_dense = a_.window > 0 ? std::min(n_vis, a_.dense_window)
                                           : std::min<double>(context, a_.dense_window + a_.dense_prefix);
      finish_row(r, ms, double(batch) * Hkv * ((n_vis - n_dense) * rec + n_dense * 4.0 * D) + io_bytes);
      rows_.push_back(std::move(r));
    }
  }

  static bool all_finite(const cuda::DeviceBuffer& out, size_t n, cuda::DType t = cuda::DType::f32) {
    std::vector<float> h(n);
    if (t == cuda::DType::f32) {
      out.download(h.data(), n * sizeof(float));
    } else {
      std::vector<uint16_t> b(n);
      out.download(b.data(), n * 2);
      for (size_t i = 0; i < n; ++i) h[i] = t == cuda::DType::f16 ? half_to_float(b[i]) : bf16_to_float(b[i]);
    }
    return std::all_of(h.begin(), h.end(), [](float x) { return std::isfinite(x); });
  }

  cuda::DType io_dtype() const {
    return a_.io == "f16" ? cuda::DType::f16 : a_.io == "bf16" ? cuda::DType::bf16 : cuda::DType::f32;
  }
  // n normal query values (sd 0.5, the f32 rows' seed) in type t.
  void fill_query(cuda::DeviceBuffer& q, size_t n, cuda::DType t) const {
    if (t == cuda::DType::f32) {
      cb::fill_normal_f32(q.as<float>(), n, a_.seed * 11 + 3, 0.0f, 0.5f, nullptr);
      return;
    }
    cuda::DeviceBuffer f(n * 4);
    cb::fill_normal_f32(f.as<float>(), n, a_.seed * 11 + 3, 0.0f, 0.5f, nullptr);
    std::vector<float> h(n);
    f.download(h.data(), n * 4);
    std::vector<uint16_t> b(n);
    for (size_t i = 0; i < n; ++i) b[i] = t == cuda::DType::f16 ? float_to_half(h[i]) : float_to_bf16(h[i]);
    q.upload(b.data(), n * 2);
  }

  // Quantize-append of one prefill block (one sequence of shape s)
  // against one read of the same block in bf16 (the engine's K and V), from bf16 input
  // (what engines hold) and from f32, with the layer's default rounding to
  // f16 (KvCache's dense format). Two times each: the kernels alone
  // (bench::AppendKernels, median of --runs, L2 flushed) and the whole
  // append_device call (tile list, one upload, kernels, status readback and
  // its stream synchronisation; events and wall time, median of --append-runs).
  void run_append(const Shape& s) {
    const int T = a_.append_tokens, Hkv = s.n_heads_kv, D = s.head_dim, R = a_.append_runs;
    const size_t n = size_t(T) * Hkv * D;
    info("gpu-bench: quantize-append of %d tokens (%s shape)", T, s.name.c_str());
    const double need_in = n * (2.0 * 4 + 2.0 * 2);
    if (need_in + (1u << 30) > double(free_bytes())) {
      info("gpu-bench: append skipped: needs %.1f GiB", gib(need_in));
      return;
    }
    cuda::DeviceBuffer kf(n * 4), vf(n * 4), kv16(n * 2 * 2), sink(sizeof(float));
    cb::fill_normal_f32(kf.as<float>(), n, a_.seed * 17 + 1, 0.0f, 1.0f, nullptr);
    cb::fill_normal_f32(vf.as<float>(), n, a_.seed * 17 + 2, 0.0f, 1.0f, nullptr);
    cb::fill_normal_bf16(kv16.as<uint16_t>(), 2 * n, a_.seed * 17 + 3, 0.0f, 1.0f, nullptr);
    const void* k16 = kv16.data();
    const void* v16 = kv16.as<uint16_t>() + n;
    const double bf16_bytes = 2.0 * n * 2;
    const double read_ms = time_median(
        [&] { cb::read_sum_bf16(kv16.data(), n * 2 * 2, sink.as<float>(), nullptr); }, a_.runs, *flush_);
    if (!a_.json_out) {
      std::printf("append %d tokens x %d heads x d %d: one read of its bf16 K+V (%.3f GB) %.4f ms; "
                  "kernels: median of %d, API: append_device, median of %d\n",
                  T, Hkv, D, bf16_bytes / 1e9, read_ms, a_.runs, R);
      std::printf("%-11s %-5s %9s %7s %7s %9s %9s %7s\n", "preset", "input", "kernel_ms", "x_read",
                  "TB/s", "api_ms", "wall_ms", "x_read");
    }
    rows_.push_back({{"kind", "append_read"}, {"shape", s.name}, {"tokens", T}, {"bf16_bytes", bf16_bytes},
                     {"bf16_read_ms", read_ms}});
    for (const KvPreset& pr : presets_) {
      json base = {{"kind", "append"}, {"shape", s.name}, {"tokens", T}, {"preset", pr.name},
                   {"k_format", pr.k_spec}, {"v_format", pr.v_spec}};
      if (auto why = gpu_unsupported(pr, D, Hkv)) {
        base["supported"] = false;
        base["note"] = "not supported on GPU yet: " + *why;
        if (!a_.json_out) std::printf("%-11s not supported on GPU yet: %s\n", pr.name.c_str(), why->c_str());
        rows_.push_back(std::move(base));
        continue;
      }
      auto kq = make_quantizer(pr.k_spec, D, a_.seed), vq = make_quantizer(pr.v_spec, D, a_.seed + 1);
      const size_t rec = kq->bytes_per_vector() + vq->bytes_per_vector();
      const double record_bytes = double(T) * Hkv * rec;
      const double pool = double(2 * R + 1) * record_bytes;
      if (pool + (1u << 30) > double(free_bytes())) {
        info("gpu-bench: append %s skipped: needs %.1f GiB", pr.name.c_str(), gib(pool));
        continue;
      }
      cuda::GpuKvLayerConfig cfg;
      cfg.n_heads_kv = Hkv;
      cfg.page_tokens = a_.page_tokens;
      cfg.max_seqs = 2 * R + 1;
      cfg.max_pages_per_seq = (T + a_.page_tokens - 1) / a_.page_tokens;
      cuda::GpuKvLayer layer(*kq, *vq, cfg);
      layer.add_sequence();
      layer.append_device(0, k16, v16, T, cuda::DType::bf16, nullptr);  // warm-up; seq 0 for the kernels
      cb::AppendKernels kernels(layer, 0, T);
      struct Input {
        cuda::DType dtype;
        const void *k, *v;
        double bytes;
      };
      for (const Input& in : {Input{cuda::DType::bf16, k16, v16, bf16_bytes},
                              Input{cuda::DType::f32, kf.data(), vf.data(), 2.0 * n * 4}}) {
        const double kernel_ms =
            time_median([&] { kernels.run(in.k, in.v, in.dtype, nullptr); }, a_.runs, *flush_);
        // append_device synchronises (it reads the device status back): the
        // event span holds its host work too; wall time alongside.
        cb::EventTimer timer(R);
        std::vector<double> wall;
        for (int i = 0; i < R; ++i) {
          const int seq = layer.add_sequence();
          flush_->flush(nullptr);
          cb::synchronize(nullptr);
          const auto t0 = std::chrono::steady_clock::now();
          timer.start(i, nullptr);
          layer.append_device(seq, in.k, in.v, T, in.dtype, nullptr);
          timer.stop(i, nullptr);
          cb::synchronize(nullptr);
          wall.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(wall.begin(), wall.end());
        const double api_ms = timer.median_ms(), wall_ms = wall[wall.size() / 2];
        json r = base;
        r["supported"] = true;
        r["input"] = cuda::to_string(in.dtype);
        r["round_to"] = cuda::to_string(cfg.round_to);
        r["kernel_ms"] = kernel_ms;
        r["api_ms"] = api_ms;
        r["wall_ms"] = wall_ms;
        r["input_bytes"] = in.bytes;
        r["record_bytes"] = record_bytes;
        r["bf16_read_ms"] = read_ms;
        r["kernel_ratio_vs_bf16_read"] = kernel_ms / read_ms;
        r["api_ratio_vs_bf16_read"] = api_ms / read_ms;
        r["kernel_tb_s"] = (in.bytes + record_bytes) / (kernel_ms * 1e-3) / 1e12;
        r["tiles"] = kernels.n_tiles();
        if (!a_.json_out)
          std::printf("%-11s %-5s %9.4f %6.2fx %7.2f %9.4f %9.4f %6.2fx\n", pr.name.c_str(),
                      cuda::to_string(in.dtype), kernel_ms, kernel_ms / read_ms,
                      r["kernel_tb_s"].get<double>(), api_ms, wall_ms, api_ms / read_ms);
        std::fflush(stdout);
        rows_.push_back(std::move(r));
      }
    }
  }

  // One decode step's append, as an engine does it every layer and step: one
  // token for each of the batch's sequences (append_batch_device from f32
  // device rows), on a layer filled with kDecodeFill tokens per sequence and
  // the --dense-window / --dense-prefix of the attention runs. The call
  // synchronises (status readback): wall time per call, median of
  // max(20, --append-runs) calls after 3 warm-ups; independent of the context.
  void run_decode_append() {
    constexpr int kDecodeFill = 512;
    const int R = std::max(20, a_.append_runs);
    bool header = false;
    for (const Shape& s : shapes_) {
      const int Hkv = s.n_heads_kv, D = s.head_dim, P = a_.page_tokens;
      for (int batch : batches_) {
        const size_t row = size_t(Hkv) * D;
        cuda::DeviceBuffer fk(kDecodeFill * row * 4), fv(kDecodeFill * row * 4), sk(batch * row * 4),
            sv(batch * row * 4);
        cb::fill_normal_f32(fk.as<float>(), kDecodeFill * row, a_.seed * 19 + 1, 0.0f, 1.0f, nullptr);
        cb::fill_normal_f32(fv.as<float>(), kDecodeFill * row, a_.seed * 19 + 2, 0.0f, 1.0f, nullptr);
        cb::fill_normal_f32(sk.as<float>(), batch * row, a_.seed * 19 + 3, 0.0f, 1.0f, nullptr);
        cb::fill_normal_f32(sv.as<float>(), batch * row, a_.seed * 19 + 4, 0.0f, 1.0f, nullptr);
        std::vector<int> seqs(batch);
        for (const KvPreset& pr : presets_) {
          if (gpu_unsupported(pr, D, Hkv)) continue;  // reported by the attention rows
          auto kq = make_quantizer(pr.k_spec, D, a_.seed), vq = make_quantizer(pr.v_spec, D, a_.seed + 1);
          cuda::GpuKvLayerConfig cfg;
          cfg.n_heads_kv = Hkv;
          cfg.page_tokens = P;
          cfg.max_seqs = batch;
          cfg.max_pages_per_seq = (kDecodeFill + 3 * R + 6 + P - 1) / P;
          cfg.dense_window = a_.dense_window;
          cfg.dense_prefix = a_.dense_prefix;
          cuda::GpuKvLayer layer(*kq, *vq, cfg);
          for (int b = 0; b < batch; ++b) {
            seqs[b] = layer.add_sequence();
            layer.append_device(seqs[b], fk.as<float>(), fv.as<float>(), kDecodeFill, nullptr);
          }
          auto step = [&] { layer.append_batch_device(seqs.data(), batch, sk.as<float>(), sv.as<float>(), nullptr); };
          for (int i = 0; i < 3; ++i) step();
          std::vector<double> wall;
          for (int i = 0; i < R; ++i) {
            cb::synchronize(nullptr);
            const auto t0 = std::chrono::steady_clock::now();
            step();
            wall.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
          }
          std::sort(wall.begin(), wall.end());
          const double ms = wall[wall.size() / 2];
          // The asynchronous variant: R calls back to back (the host's time
          // per call), then the one check_appends of the batch of steps
          // (host + device time per call, the device's work included).
          cb::synchronize(nullptr);
          const auto a0 = std::chrono::steady_clock::now();
          for (int i = 0; i < R; ++i)
            layer.append_batch_device_async(seqs.data(), batch, sk.as<float>(), sv.as<float>(), nullptr);
          const auto a1 = std::chrono::steady_clock::now();
          layer.check_appends();
          const auto a2 = std::chrono::steady_clock::now();
          const double async_ms = std::chrono::duration<double, std::milli>(a1 - a0).count() / R;
          const double async_all_ms = std::chrono::duration<double, std::milli>(a2 - a0).count() / R;
          // The captured step (reserve_steps / append_step_device; with
          // dense tokens the device plans their moves too): R replays of a
          // graph holding one step, back to back between two events: device
          // time per step, no host work per call but the graph launch.
          double graph_ms = -1;
          {
            layer.reserve_steps(seqs.data(), batch, R + 1);
            cb::CapturedGraph graph;
            graph.begin_capture();
            layer.append_step_device(sk.data(), sv.data(), cuda::DType::f32, graph.stream());
            graph.end_capture();
            graph.replay();  // warm-up
            cb::EventTimer ev(1);
            ev.start(0, graph.stream());
            for (int i = 0; i < R - 1; ++i) graph.launch();
            ev.stop(0, graph.stream());
            graph_ms = ev.ms(0) / (R - 1);
            layer.check_appends();
          }
          json r = {{"kind", "append_decode"}, {"shape", s.name}, {"batch", batch}, {"preset", pr.name},
                    {"k_format", pr.k_spec}, {"v_format", pr.v_spec}, {"dense_window", a_.dense_window},
                    {"dense_prefix", a_.dense_prefix}, {"fill_tokens", kDecodeFill}, {"runs", R},
                    {"wall_ms", ms}, {"us_per_seq", 1000.0 * ms / batch}, {"async_host_ms", async_ms},
                    {"async_ms", async_all_ms}};
          r["graph_step_ms"] = graph_ms;
          r["step_kernel"] = layer.step_kernel();
          if (!a_.json_out) {
            if (!header)
              std::printf("decode-step append (one token per sequence, dense %d + %d): append_batch_device "
                          "wall time per call (median of %d); append_batch_device_async: host time per call "
                          "and with the device's (%d calls, one check_appends); graph_ms: a captured "
                          "append_step_device, device time per step (%d replays back to back)\n%-6s %5s %-11s %9s %10s %10s %9s %9s\n",
                          a_.dense_window, a_.dense_prefix, R, R, R - 1, "shape", "batch", "preset", "wall_ms",
                          "us/seq", "async_host", "async_ms", "graph_ms");
            header = true;
            std::printf("%-6s %5d %-11s %9.4f %10.2f %10.4f %9.4f ", s.name.c_str(), batch, pr.name.c_str(), ms,
                        1000.0 * ms / batch, async_ms, async_all_ms);
            std::printf("%9.4f\n", graph_ms);
            std::fflush(stdout);
          }
          rows_.push_back(std::move(r));
        }
      }
    }
  }

  const Args& a_;
  std::vector<Shape> shapes_;
  std::vector<int> batches_, contexts_;
  std::vector<KvPreset> presets_;
  std::map<SdpaKey, SdpaBest> sdpa_;
  std::unique_ptr<cb::L2Flusher> flush_;
  Ceilings ceil_;
  int sm_count_ = 0;
  double dense_ms_ = 0;
  std::optional<cuda::DeviceBuffer> floor_buf_, floor_sink_;  // read_floor_ms's source and sink
  std::vector<json> rows_;
};

}  // namespace

Runner add_gpu_bench(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand(
      "gpu-bench", "GPU decode attention: packed codes (GpuKvLayer) vs our dense bf16 kernel vs PyTorch SDPA");
  sub->add_option("--shape", a->shapes, "Comma list of layer shapes: llama (Hq 32, Hkv 8, d 128), gemma (Hq 4, Hkv 1, d 256)")
      ->capture_default_str();
  sub->add_option("--batch", a->batches, "Comma list of batch sizes")->capture_default_str();
  sub->add_option("--context", a->contexts, "Comma list of context lengths (tokens per sequence)")
      ->capture_default_str();
  sub->add_option("--preset", a->presets, "Comma list of KV presets (tq kv-presets); dense_bf16 always runs")
      ->capture_default_str();
  sub->add_option("--runs", a->runs, "Timed launches per case (median)")->check(CLI::Range(20, 10000))->capture_default_str();
  sub->add_option("--page-tokens", a->page_tokens, "GPU layer page size in tokens")
      ->check(CLI::Range(1, 65536))
      ->capture_default_str();
  sub->add_option("--split-pages", a->split_pages, "Pages per split-KV part (0 = fill the device)")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  sub->add_option("--append-tokens", a->append_tokens, "Tokens of the timed prefill append (one sequence of each --shape)")
      ->check(CLI::Range(1, 1 << 22))
      ->capture_default_str();
  sub->add_option("--append-runs", a->append_runs, "Timed append_device calls per preset and input type (median)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  sub->add_flag("--no-append", a->no_append, "Skip the quantize-append timings (prefill block and decode step)");
  sub->add_option("--dense-window", a->dense_window,
                  "Newest tokens each compressed layer keeps dense (GpuKvLayerConfig::dense_window)")
      ->check(CLI::Range(0, 1 << 20))->capture_default_str();
  sub->add_option("--dense-prefix", a->dense_prefix,
                  "First tokens each compressed layer keeps dense (GpuKvLayerConfig::dense_prefix)")
      ->check(CLI::Range(0, 1 << 20))->capture_default_str();
  sub->add_option("--seed", a->seed, "Seed of the random data and quantizers")->capture_default_str();
  sub->add_option("--io", a->io, "Element type of the compressed attend's query and output (f32, f16, bf16)")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}))
      ->capture_default_str();
  sub->add_flag("--json", a->json_out, "Print one JSON array of objects (rows of kind device, attend, append_read, append, append_decode)");
  sub->add_option("--json-file", a->json_file, "Also write the JSON array to this file");
  sub->add_option("--window", a->window,
                  "Sliding-window attention over the newest N tokens (AttentionParams::window; 0: none). The "
                  "dense bf16 row and the --sdpa match then use min(context, N) tokens, what a dense engine reads")
      ->check(CLI::Range(0, 1 << 30));
  sub->add_option("--sdpa", a->sdpa_file, "JSON of scripts/sdpa_bench.py: adds sdpa_ms and speedup_vs_sdpa");
  return [a] { return Bench(*a).run(); };
}

}  // namespace tq::cli
