// tq kv-bench: one decode step of attention over a filled KV cache, for each
// preset against dense fp32 and fp16 in the same process.
#include <algorithm>
#include <chrono>
#include <cmath>
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
  int context = 4096;
  int heads_q = 32, heads_kv = 8, dim = 128;
  int threads = 1;
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
};

Result run_preset(const std::string& preset, const Args& a, const std::vector<float>& k,
                  const std::vector<float>& v, const std::vector<float>& q,
                  const std::vector<float>& ref, bool want_errors) {
  KvCacheConfig cfg = KvCacheConfig::from_preset(preset, 1, a.heads_kv, a.dim);
  cfg.seed = a.seed;
  KvCache cache(cfg);
  const int seq = cache.add_sequence();
  cache.append(seq, 0, k.data(), v.data(), a.context);
  Result r;
  r.preset = preset;
  const KvMemoryReport mem = cache.memory();
  r.bytes_per_token = double(mem.used.total()) / a.context;
  r.ratio = double(mem.dense_equivalent) / double(mem.used.total());
  std::vector<float> out(q.size());
  cache.attend(seq, 0, q.data(), a.heads_q, {}, out.data(), nullptr, -1, a.threads);  // warm up
  std::vector<double> times;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; a.repeats > 0 ? i < a.repeats : (i < 5 || (i < 200 && std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 0.3)); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    cache.attend(seq, 0, q.data(), a.heads_q, {}, out.data(), nullptr, -1, a.threads);
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  r.ms = times[times.size() / 2];
  if (want_errors) {
    r.rel = rel_err(out, ref);
    std::vector<float> kd(k.size()), vd(v.size());
    cache.dequantize(seq, 0, kd.data(), vd.data());
    r.rel_dq = rel_err(out, reference(q, a, kd, vd, a.threads));
  }
  return r;
}

int run(const Args& a) {
  TQ_REQUIRE(a.heads_q % a.heads_kv == 0, "--heads-q ", a.heads_q, " must be a multiple of --heads-kv ",
             a.heads_kv);
  const std::vector<std::string> presets = split_presets(a.presets);
  for (const auto& p : presets) find_kv_preset(p);  // validate all names before any work
  const std::vector<float> k = synthetic(a.context, a.heads_kv, a.dim, derive_seed(a.seed, "k"), true);
  const std::vector<float> v = synthetic(a.context, a.heads_kv, a.dim, derive_seed(a.seed, "v"), false);
  std::vector<float> q = synthetic(1, a.heads_q, a.dim, derive_seed(a.seed, "q"), true);
  for (auto& x : q) x *= 0.25f;
  if (!a.json)
    std::fprintf(stderr, "kv-bench: context %d, Hq %d, Hkv %d, d %d, threads %d; computing fp64 reference...\n",
                 a.context, a.heads_q, a.heads_kv, a.dim, a.threads);
  const std::vector<float> ref = reference(q, a, k, v, a.threads <= 0 ? 0 : a.threads);
  const Result f32 = run_preset("dense-f32", a, k, v, q, ref, false);
  const Result f16 = run_preset("dense-f16", a, k, v, q, ref, false);
  if (!a.json)
    std::printf("%-12s %8s %8s %9s %10s %8s %10s %12s\n", "preset", "ctx", "B/token", "vs bf16",
                "ms/step", "speedup", "rel_err", "rel_err_dq");
  if (!a.json)
    for (const Result* d : {&f32, &f16})
      std::printf("%-12s %8d %8.1f %8.2fx %10.3f %7.2fx %10s %12s\n", d->preset.c_str(), a.context,
                  d->bytes_per_token, d->ratio, d->ms, f16.ms / d->ms, "-", "-");
  nlohmann::json out = nlohmann::json::array();
  bool ok = true;
  for (const auto& p : presets) {
    if (!a.json) std::fprintf(stderr, "  %s...\n", p.c_str());
    const Result r = run_preset(p, a, k, v, q, ref, true);
    ok = ok && r.rel_dq <= 1e-5;
    if (a.json) {
      out.push_back({{"preset", r.preset}, {"context", a.context}, {"dim", a.dim},
                     {"bytes_per_token", r.bytes_per_token}, {"compression_ratio", r.ratio},
                     {"ms_per_step", r.ms}, {"dense_f16_ms_per_step", f16.ms},
                     {"dense_f32_ms_per_step", f32.ms}, {"speedup", f16.ms / r.ms},
                     {"rel_err", r.rel}, {"rel_err_dequant", r.rel_dq}});
    } else {
      std::printf("%-12s %8d %8.1f %8.2fx %10.3f %7.2fx %10.5f %12.2e\n", r.preset.c_str(), a.context,
                  r.bytes_per_token, r.ratio, r.ms, f16.ms / r.ms, r.rel, r.rel_dq);
    }
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
  sub->add_option("--context", a->context, "Tokens in the cache")
      ->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  sub->add_option("--heads-q", a->heads_q, "Query heads")->check(CLI::Range(1, 1024))->capture_default_str();
  sub->add_option("--heads-kv", a->heads_kv, "KV heads")->check(CLI::Range(1, 1024))->capture_default_str();
  sub->add_option("--dim", a->dim, "Head dimension")->check(CLI::Range(8, 4096))->capture_default_str();
  sub->add_option("--threads", a->threads, "Threads (0 = all cores)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  sub->add_option("--repeats", a->repeats, "Timed runs per preset (0 = about 0.3 s worth)")
      ->check(CLI::Range(0, 100000));
  sub->add_option("--seed", a->seed, "Seed for data and quantizers")->capture_default_str();
  sub->add_flag("--check", a->check, "Exit non-zero unless every rel_err_dequant <= 1e-5");
  sub->add_flag("--json", a->json, "Print one JSON array of objects");
  return [a] { return run(*a); };
}

}  // namespace tq::cli
