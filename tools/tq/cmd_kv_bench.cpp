// tq kv-bench: one decode step of attention over a filled KV cache, for each
// preset against dense fp32 and fp16 in the same process, all timed round
// robin (one step of each in turn) so that a machine whose memory bandwidth
// drifts (a shared VM) moves them alike; and against the read floor of each
// cache: a pure read of the bytes it holds with the same threads, the time
// any attention over them needs at least on this machine.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_util.hpp"
#include "commands.hpp"
#include "turboquant/attention.hpp"
#include "turboquant/error.hpp"
#include "turboquant/kv_cache.hpp"
#include "turboquant/parallel.hpp"
#include "turboquant/rng.hpp"

namespace tq::cli {
namespace {

struct Args {
  std::string presets = "paper_mse,turbo4";
  std::string contexts = "4096";  // comma list
  std::string thread_list = "1";  // comma list; 0 = all cores
  int context = 4096;             // the one being run
  int heads_q = 32, heads_kv = 8, dim = 128;
  int threads = 1;                // the one the reference uses
  int repeats = 0;  // 0: enough for ~0.3 s per preset
  uint64_t seed = 1;
  bool check = false;
  bool json = false;
};

// Keys and values with realistic structure: per-channel means, a few
// large-magnitude channels (as seen in LLM keys), Gaussian noise.
std::vector<float> synthetic(size_t n_tokens, int heads, int dim, uint64_t seed, bool keys) {
  Rng rng(seed);
  std::vector<float> mean(size_t(heads) * dim), sd(size_t(heads) * dim);
  for (size_t c = 0; c < mean.size(); ++c) {
    mean[c] = static_cast<float>(rng.gaussian() * (keys ? 0.5 : 0.2));
    sd[c] = keys && rng.uniform() < 0.05 ? 8.0f : 1.0f;
  }
  std::vector<float> x(n_tokens * heads * dim);
  for (size_t t = 0; t < n_tokens; ++t)
    for (size_t c = 0; c < mean.size(); ++c)
      x[t * mean.size() + c] = mean[c] + sd[c] * static_cast<float>(rng.gaussian());
  return x;
}

double rel_err(const std::vector<float>& a, const std::vector<float>& ref) {
  double e = 0, r = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
    r += double(ref[i]) * ref[i];
  }
  return std::sqrt(e / std::max(r, 1e-300));
}

std::vector<float> reference(const std::vector<float>& q, const Args& a, const std::vector<float>& k,
                             const std::vector<float>& v, int threads) {
  std::vector<float> out(q.size());
  const int g = a.heads_q / a.heads_kv;
  parallel_for(a.heads_q, threads, [&](size_t h) {
    const int kvh = static_cast<int>(h) / g;
    attention_ref(q.data() + h * a.dim, k.data() + size_t(kvh) * a.dim, v.data() + size_t(kvh) * a.dim,
                  a.context, size_t(a.heads_kv) * a.dim, a.dim, a.context - 1, {}, out.data() + h * a.dim);
  });
  return out;
}

struct Result {
  std::string preset;
  double bytes_per_token = 0, ratio = 0, ms = 0, rel = 0, rel_dq = 0;
  size_t bytes = 0;  // what the cache holds (the bytes one step reads)
};

// Pure reads for the floor: `threads` contiguous chunks of a buffer, each
// XOR-reduced with 8 independent accumulators (the compiler vectorises it);
// the result goes to an atomic so that the loads cannot be dropped.
std::atomic<uint64_t> g_read_sink{0};
uint64_t xor_chunk(const uint64_t* p, size_t n) {
  uint64_t acc[8] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] ^= p[i + k];
  for (; i < n; ++i) acc[0] ^= p[i];
  uint64_t x = 0;
  for (uint64_t a : acc) x ^= a;
  return x;
}
void read_bytes(const std::vector<uint64_t>& buf, size_t bytes, int threads) {
  const size_t words = std::min(buf.size(), bytes / 8);
  const int t = threads <= 0 ? hardware_threads() : threads;
  parallel_for(size_t(t), t, [&](size_t c) {
    const size_t w0 = words * c / t, w1 = words * (c + 1) / t;
    g_read_sink.fetch_xor(xor_chunk(buf.data() + w0, w1 - w0), std::memory_order_relaxed);
  });
}

// A filled cache of one preset; timed at each thread count.
struct Bench {
  KvCache cache;
  int seq;
  explicit Bench(const KvCacheConfig& c) : cache(c), seq(cache.add_sequence()) {}
};

std::unique_ptr<Bench> fill(const std::string& preset, const Args& a, const std::vector<float>& k,
                            const std::vector<float>& v) {
  KvCacheConfig cfg = KvCacheConfig::from_preset(preset, 1, a.heads_kv, a.dim);
  cfg.seed = a.seed;
  auto b = std::make_unique<Bench>(cfg);
  b->cache.append(b->seq, 0, k.data(), v.data(), a.context);
  return b;
}

// Median ms of each job, the jobs run round robin (one run of each in turn,
// after one warm-up run of each): --repeats rounds, or about 0.3 s a job.
std::vector<double> time_round_robin(const std::vector<std::function<void()>>& jobs, const Args& a) {
  for (const auto& j : jobs) j();
  std::vector<std::vector<double>> times(jobs.size());
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  const double budget = 0.3 * double(jobs.size());
  for (int i = 0; a.repeats > 0 ? i < a.repeats : (i < 5 || (i < 200 && elapsed() < budget)); ++i)
    for (size_t j = 0; j < jobs.size(); ++j) {
      const auto t0 = std::chrono::steady_clock::now();
      jobs[j]();
      times[j].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  std::vector<double> med;
  for (auto& t : times) {
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    med.push_back(t[t.size() / 2]);
  }
  return med;
}

Result describe(const std::string& preset, const Bench& b, const Args& a) {
  Result r;
  r.preset = preset;
  const KvMemoryReport mem = b.cache.memory();
  r.bytes_per_token = double(mem.used.total()) / a.context;
  r.ratio = double(mem.dense_equivalent) / double(mem.used.total());
  r.bytes = mem.used.total();
  return r;
}

// One context: every preset filled once, then timed at each thread count.
bool run_context(const Args& a, const std::vector<std::string>& presets, const std::vector<int>& threads,
                 nlohmann::json& out) {
  const std::vector<float> k = synthetic(a.context, a.heads_kv, a.dim, derive_seed(a.seed, "k"), true);
  const std::vector<float> v = synthetic(a.context, a.heads_kv, a.dim, derive_seed(a.seed, "v"), false);
  std::vector<float> q = synthetic(1, a.heads_q, a.dim, derive_seed(a.seed, "q"), true);
  for (auto& x : q) x *= 0.25f;
  const int ref_threads = *std::max_element(threads.begin(), threads.end()) == 0
                              ? 0
                              : *std::max_element(threads.begin(), threads.end());
  if (!a.json)
    std::fprintf(stderr, "kv-bench: context %d, Hq %d, Hkv %d, d %d; computing fp64 reference...\n",
                 a.context, a.heads_q, a.heads_kv, a.dim);
  const std::vector<float> ref = reference(q, a, k, v, ref_threads);
  std::vector<float> o(q.size());
  const auto f32 = fill("dense-f32", a, k, v);
  const auto f16 = fill("dense-f16", a, k, v);
  const Result d32 = describe("dense-f32", *f32, a), d16 = describe("dense-f16", *f16, a);
  struct Row {
    Result r;
    std::unique_ptr<Bench> b;
  };
  std::vector<Row> rows;
  bool ok = true;
  for (const auto& p : presets) {
    if (!a.json) std::fprintf(stderr, "  %s...\n", p.c_str());
    auto b = fill(p, a, k, v);
    Row row{describe(p, *b, a), nullptr};
    b->cache.attend(b->seq, 0, q.data(), a.heads_q, {}, o.data(), nullptr, -1, threads.front());
    row.r.rel = rel_err(o, ref);
    std::vector<float> kd(k.size()), vd(v.size());
    b->cache.dequantize(b->seq, 0, kd.data(), vd.data());
    row.r.rel_dq = rel_err(o, reference(q, a, kd, vd, ref_threads));
    ok = ok && row.r.rel_dq <= 1e-5;
    row.b = std::move(b);
    rows.push_back(std::move(row));
  }
  // The read floor's source: as large as the largest cache (dense f32).
  std::vector<uint64_t> floor_buf(d32.bytes / 8 + 1, 0x9e3779b97f4a7c15ull);
  for (size_t ti = 0; ti < threads.size(); ++ti) {
    const int t = threads[ti];
    const int t_real = t <= 0 ? hardware_threads() : t;
    // Jobs: attend on each cache (dense f32, dense f16, the presets), then
    // the read floor of each cache's bytes.
    std::vector<const Bench*> benches = {f32.get(), f16.get()};
    std::vector<const Result*> results = {&d32, &d16};
    for (const Row& row : rows) {
      benches.push_back(row.b.get());
      results.push_back(&row.r);
    }
    std::vector<std::function<void()>> jobs;
    for (const Bench* b : benches)
      jobs.push_back([&, b] { b->cache.attend(b->seq, 0, q.data(), a.heads_q, {}, o.data(), nullptr, -1, t); });
    for (const Result* r : results) jobs.push_back([&, r] { read_bytes(floor_buf, r->bytes, t); });
    const std::vector<double> med = time_round_robin(jobs, a);
    const size_t n = benches.size();
    const double ms32 = med[0], ms16 = med[1], floor16 = med[n + 1];
    if (!a.json) {
      std::printf("%-13s %8s %8s %8s %9s %10s %8s %10s %12s %9s %9s\n", "preset", "ctx", "threads", "B/token",
                  "vs bf16", "ms/step", "speedup", "rel_err", "rel_err_dq", "floor_ms", "of_floor");
      for (size_t i = 0; i < 2; ++i)
        std::printf("%-13s %8d %8d %8.1f %8.2fx %10.3f %7.2fx %10s %12s %9.3f %8.0f%%\n", results[i]->preset.c_str(),
                    a.context, t_real, results[i]->bytes_per_token, results[i]->ratio, med[i], ms16 / med[i], "-",
                    "-", med[n + i], 100 * med[n + i] / med[i]);
    }
    for (size_t i = 2; i < n; ++i) {
      const Result& r = *results[i];
      const double ms = med[i], floor = med[n + i];
      if (a.json) {
        out.push_back({{"preset", r.preset}, {"context", a.context}, {"dim", a.dim}, {"threads", t_real},
                       {"bytes_per_token", r.bytes_per_token}, {"compression_ratio", r.ratio},
                       {"ms_per_step", ms}, {"dense_f16_ms_per_step", ms16},
                       {"dense_f32_ms_per_step", ms32}, {"speedup", ms16 / ms},
                       {"rel_err", r.rel}, {"rel_err_dequant", r.rel_dq},
                       {"read_floor_ms", floor}, {"floor_share", floor / ms},
                       {"dense_f16_read_floor_ms", floor16}, {"dense_f16_floor_share", floor16 / ms16}});
      } else {
        std::printf("%-13s %8d %8d %8.1f %8.2fx %10.3f %7.2fx %10.5f %12.2e %9.3f %8.0f%%\n", r.preset.c_str(),
                    a.context, t_real, r.bytes_per_token, r.ratio, ms, ms16 / ms, r.rel, r.rel_dq, floor,
                    100 * floor / ms);
      }
    }
  }
  return ok;
}

int run(Args a) {
  TQ_REQUIRE(a.heads_q % a.heads_kv == 0, "--heads-q ", a.heads_q, " must be a multiple of --heads-kv ",
             a.heads_kv);
  const std::vector<std::string> presets = split_presets(a.presets);
  for (const auto& p : presets) find_kv_preset(p);  // validate all names before any work
  const std::vector<int> contexts = parse_int_list("--context", a.contexts);
  const std::vector<int> threads = parse_int_list("--threads", a.thread_list);
  for (int c : contexts)
    TQ_REQUIRE(c >= 1 && c <= (1 << 24), "--context: ", c, " is outside 1..16777216");
  for (int t : threads) TQ_REQUIRE(t >= 0 && t <= 1024, "--threads: ", t, " is outside 0..1024 (0 = all cores)");
  nlohmann::json out = nlohmann::json::array();
  bool ok = true;
  for (int c : contexts) {
    a.context = c;
    ok = run_context(a, presets, threads, out) && ok;
  }
  if (a.json) std::printf("%s\n", out.dump(2).c_str());
  if (a.check && !ok) {
    std::fprintf(stderr, "kv-bench: --check failed: some rel_err_dequant > 1e-5\n");
    return 1;
  }
  return 0;
}

}  // namespace

Runner add_kv_bench(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand(
      "kv-bench", "Time one decode step of attention on a filled KV cache, per preset vs dense");
  sub->add_option("--preset", a->presets, "Comma list of KV presets (tq kv-presets lists them)")
      ->capture_default_str();
  sub->add_option("--context", a->contexts, "Tokens in the cache (comma list: one table per context)")
      ->capture_default_str();
  sub->add_option("--heads-q", a->heads_q, "Query heads")->check(CLI::Range(1, 1024))->capture_default_str();
  sub->add_option("--heads-kv", a->heads_kv, "KV heads")->check(CLI::Range(1, 1024))->capture_default_str();
  sub->add_option("--dim", a->dim, "Head dimension")->check(CLI::Range(8, 4096))->capture_default_str();
  sub->add_option("--threads", a->thread_list, "Threads (comma list; 0 = all cores), each timed on the same caches")
      ->capture_default_str();
  sub->add_option("--repeats", a->repeats, "Timed runs per preset (0 = about 0.3 s worth)")
      ->check(CLI::Range(0, 100000));
  sub->add_option("--seed", a->seed, "Seed for data and quantizers")->capture_default_str();
  sub->add_flag("--check", a->check, "Exit non-zero unless every rel_err_dequant <= 1e-5");
  sub->add_flag("--json", a->json, "Print one JSON array of objects");
  return [a] { return run(*a); };
}

}  // namespace tq::cli
