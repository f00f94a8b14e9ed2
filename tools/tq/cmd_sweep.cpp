// tq sweep: quality against bit budget. One tq::evaluate call (the dense
// reference runs once) over MSE-key presets at 2, 2.5, 3, 3.5 and 4 bits,
// prod-key presets (tq-prod keys, MSE values of the same width) at the integer
// widths tq-prod supports, and the q4_0 / q8_0 baselines with and without a
// Hadamard rotation. Writes DIR/sweep.json, DIR/sweep.md and, through
// scripts/plot_sweep.py (matplotlib), DIR/sweep.png.
#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_util.hpp"
#include "commands.hpp"
#include "turboquant/error.hpp"
#include "turboquant/eval.hpp"
#include "turboquant/kv_cache.hpp"
#include "turboquant/model.hpp"
#include "turboquant/model_registry.hpp"
#include "turboquant/needle.hpp"
#include "turboquant/parallel.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq::cli {
namespace {

namespace fs = std::filesystem;

struct Args {
  std::string model = "smollm2-135m";
  std::string text = "prose";
  std::string out = "sweep";
  std::string plot_script, python = "python3";
  int ctx = 1024, max_tokens = 2048, threads = 0;
  int dense_window = 0, dense_prefix = 0;  // the formats alone, unlike eval's defaults
  bool json = false, no_plot = false, allow_unsupported = false;
};

struct SweepPoint {
  const char* series;  // mse: MSE keys; mse+out: with outlier channels; prod: tq-prod keys; q, q-had: llama.cpp blocks
  double bits;         // nominal K/V width
  const char* preset;
};

// tq-prod takes integer total bits only (format.hpp), so the prod series has
// no 2.5 / 3.5 points.
const std::vector<SweepPoint>& sweep_points() {
  static const std::vector<SweepPoint> p = {
      {"mse", 2, "k=tq-mse:b=2/v=tq-mse:b=2"},  // there is no turbo2 preset
      {"mse", 2.5, "turbo2.5"},
      {"mse", 3, "turbo3"},
      {"mse", 3.5, "turbo3.5"},
      {"mse", 4, "turbo4"},
      // MSE keys whose largest 1/8 of channels (per head, chosen from the
      // first tokens) are coded 2 bits wider; V plain MSE at the same width.
      {"mse+out", 2, "k=tq-mse:b=2,hi=12.5%,hb=4/v=tq-mse:b=2"},
      {"mse+out", 3, "k=tq-mse:b=3,hi=12.5%,hb=5/v=tq-mse:b=3"},
      {"mse+out", 4, "turbo4-out"},
      {"prod", 2, "k=tq-prod:b=2/v=tq-mse:b=2"},
      {"prod", 3, "k=tq-prod:b=3/v=tq-mse:b=3"},
      {"prod", 4, "k=tq-prod:b=4/v=tq-mse:b=4"},
      {"q", 4, "q4_0"},
      {"q-had", 4, "q4_0-had"},
      {"q", 8, "q8_0"},
      {"q-had", 8, "q8_0-had"},
  };
  return p;
}

// Through a temporary file and a rename: an existing result is never half-overwritten.
void write_file(const fs::path& path, const std::string& data) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    TQ_REQUIRE(f, "--out: cannot write '", tmp.string(), "'");
    f << data;
    f.flush();
    TQ_REQUIRE(f, "--out: writing '", tmp.string(), "' failed");
  }
  fs::rename(tmp, path);
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// --plot-script, else scripts/plot_sweep.py in a folder above the executable
// (build/<dir>/tools/tq/tq sits in the source tree), else in the source tree
// this binary was built from.
std::string find_plot_script(const std::string& given) {
  if (!given.empty()) {
    TQ_REQUIRE(fs::exists(given), "--plot-script: no file '", given, "'");
    return given;
  }
  std::error_code ec;
  fs::path dir = fs::read_symlink("/proc/self/exe", ec).parent_path();
  for (; !ec && !dir.empty() && dir != dir.root_path(); dir = dir.parent_path())
    if (fs::exists(dir / "scripts" / "plot_sweep.py")) return (dir / "scripts" / "plot_sweep.py").string();
#ifdef TQ_SOURCE_DIR
  if (fs::exists(fs::path(TQ_SOURCE_DIR) / "scripts" / "plot_sweep.py"))
    return (fs::path(TQ_SOURCE_DIR) / "scripts" / "plot_sweep.py").string();
#endif
  return "";
}

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

std::string with_commas(size_t v) {
  std::string s = std::to_string(v);
  for (int i = int(s.size()) - 3; i > 0; i -= 3) s.insert(size_t(i), ",");
  return s;
}

int run(const Args& a) {
  auto model = Model::load(resolve_model(a.model), a.allow_unsupported);
  const ModelConfig& c = model->config();
  const Tokenizer tok = Tokenizer::from_gguf(model->file());
  EvalText text = load_eval_text(a.text);
  const std::vector<int32_t> ids = eval_tokens(tok, text, a.max_tokens);
  std::vector<std::string> presets;
  for (const auto& p : sweep_points()) presets.push_back(p.preset);

  EvalOptions o;
  o.ctx = a.ctx;
  o.threads = a.threads > 0 ? a.threads : hardware_threads();
  o.bos = tok.add_bos_default() ? tok.bos_id() : -1;
  o.dense_window = a.dense_window;
  o.dense_prefix = a.dense_prefix;
  o.progress = progress_bar("positions");
  const fs::path dir = a.out;
  fs::create_directories(dir);
  std::fprintf(stderr, "tq sweep: %s, %zu tokens of %s; ctx %d, dense window %d, dense prefix %d, %zu presets + "
               "dense-f16, %d threads\n", c.name.c_str(), ids.size(), text.source.c_str(), a.ctx, a.dense_window,
               a.dense_prefix, presets.size(), o.threads);
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<EvalResult> rs = evaluate(*model, ids, presets, o);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (o.progress) std::fprintf(stderr, "\n");

  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  std::ostringstream md;
  md << "`tq sweep -m " << a.model << " --ctx " << a.ctx << " --max-tokens " << a.max_tokens << " --text " << a.text
     << (a.dense_window ? " --dense-window " + std::to_string(a.dense_window) : std::string())
     << (a.dense_prefix ? " --dense-prefix " + std::to_string(a.dense_prefix) : std::string()) << "`: " << c.name << ", " << rs.front().tokens << " scored tokens, dense-f16 ppl "
     << fmt("%.3f", rs.front().ppl_dense) << ", " << fmt("%.0f", secs) << " s.\n\n"
     << "| series | preset | K | V | bits/coord | ppl | Δppl % | KL mean | KL max | top-1 | KV bytes | vs dense f16 |\n"
     << "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  for (size_t i = 0; i < rs.size(); ++i) {
    const SweepPoint& p = sweep_points()[i];
    const EvalResult& r = rs[i];
    const KvPreset kp = find_kv_preset(p.preset);
    const double bits = kv_bits_per_coord(p.preset, c.head_dim);
    // The same figure from the bytes the caches held: the reference is 16 bits.
    const double bits_bytes = 16.0 * double(r.kv_bytes) / double(std::max<size_t>(r.kv_bytes_dense, 1));
    if (std::fabs(bits_bytes - bits) > 0.01)
      std::fprintf(stderr, "tq sweep: warning: %s: %.4f bits per coordinate from the formats, %.4f from the "
                   "cache's bytes\n", p.preset, bits, bits_bytes);
    out.push_back({{"series", p.series}, {"bits", p.bits}, {"preset", r.preset}, {"k_spec", kp.k_spec},
                   {"v_spec", kp.v_spec}, {"bits_per_coord", bits}, {"ppl", r.ppl}, {"ppl_dense", r.ppl_dense},
                   {"ppl_delta_pct", r.ppl_delta_pct}, {"kl_mean", r.kl_mean}, {"kl_max", r.kl_max},
                   {"top1_agree", r.top1_agree}, {"kv_bytes", r.kv_bytes}, {"kv_bytes_dense", r.kv_bytes_dense},
                   {"tokens", r.tokens}, {"model", c.name}, {"ctx", a.ctx}});
    md << "| " << p.series << " | " << r.preset << " | " << kp.k_spec << " | " << kp.v_spec << " | "
       << fmt("%.3f", bits) << " | " << fmt("%.3f", r.ppl) << " | " << fmt("%+.2f", r.ppl_delta_pct) << " | "
       << fmt("%.4f", r.kl_mean) << " | " << fmt("%.3f", r.kl_max) << " | " << fmt("%.3f", r.top1_agree) << " | "
       << with_commas(r.kv_bytes) << " | "
       << fmt("%.2fx", double(r.kv_bytes_dense) / double(std::max<size_t>(r.kv_bytes, 1))) << " |\n";
  }
  write_file(dir / "sweep.json", out.dump(2) + "\n");
  write_file(dir / "sweep.md", md.str());
  if (a.json) std::printf("%s\n", out.dump(2).c_str());
  else std::printf("%s", md.str().c_str());
  std::fprintf(stderr, "tq sweep: wrote %s and %s\n", (dir / "sweep.json").c_str(), (dir / "sweep.md").c_str());
  if (a.no_plot) return 0;

  const std::string script = find_plot_script(a.plot_script);
  if (script.empty()) {
    std::fprintf(stderr, "tq sweep: error: scripts/plot_sweep.py not found above %s nor in the source tree; pass "
                 "--plot-script PATH (the JSON and markdown are written)\n", "the executable");
    return 3;
  }
  const fs::path png = dir / "sweep.png";
  // python3 first; a pyenv or venv python3 on PATH often lacks matplotlib
  // while Debian's python3-matplotlib is installed for /usr/bin/python3, so
  // that one is tried next when the first reports matplotlib missing (exit 3).
  std::vector<std::string> pythons = {a.python};
  if (a.python == "python3" && fs::exists("/usr/bin/python3")) pythons.push_back("/usr/bin/python3");
  int rc = -1;
  std::string cmd;
  for (const auto& py : pythons) {
    cmd = shell_quote(py) + " " + shell_quote(script) + " " + shell_quote((dir / "sweep.json").string()) + " " +
          shell_quote(png.string());
    const int st = std::system(cmd.c_str());
    rc = st == -1 ? -1 : WIFEXITED(st) ? WEXITSTATUS(st) : 128;
    if (rc != 3) break;  // done, or failed for another reason than a missing matplotlib
  }
  if (rc != 0) {
    std::fprintf(stderr, "tq sweep: error: the plot failed (%s exited with %d): it needs python3 with matplotlib "
                 "(Debian: apt-get install python3-matplotlib, or --python PATH); %s and %s are written\n",
                 cmd.c_str(), rc, (dir / "sweep.json").c_str(), (dir / "sweep.md").c_str());
    return 3;
  }
  std::fprintf(stderr, "tq sweep: wrote %s\n", png.c_str());
  return 0;
}

}  // namespace

Runner add_sweep(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand(
      "sweep", "Quality against bits per coordinate: MSE- and prod-key presets at 2..4 bits, q4_0/q8_0 (+Hadamard); "
               "writes DIR/sweep.json, sweep.md, sweep.png");
  sub->add_option("-m,--model", a->model, "Model name (tq models list) or GGUF path")->capture_default_str();
  sub->add_option("--text", a->text,
                  "Text file, or 'prose' (the book in Debian package cfi-en) or 'code' (nlohmann-json3-dev headers)")
      ->capture_default_str();
  sub->add_option("--ctx", a->ctx, "Positions per window (BOS included)")->check(CLI::Range(2, 1 << 20))
      ->capture_default_str();
  sub->add_option("--max-tokens", a->max_tokens, "Use only the first T tokens of the text (0 = all)")
      ->check(CLI::Range(0, 1 << 30))->capture_default_str();
  sub->add_option("--dense-window", a->dense_window,
                  "Keep the newest W tokens dense (default 0: the formats alone, unlike tq eval)")
      ->check(CLI::Range(0, 1 << 30))->capture_default_str();
  sub->add_option("--dense-prefix", a->dense_prefix,
                  "Keep the first S tokens dense (default 0: the formats alone, unlike tq eval)")
      ->check(CLI::Range(0, 1 << 30))->capture_default_str();
  sub->add_option("--out", a->out, "Output folder (created)")->capture_default_str();
  sub->add_option("--threads", a->threads, "Threads (0 = all cores)")->check(CLI::Range(0, 1024))
      ->capture_default_str();
  sub->add_option("--plot-script", a->plot_script,
                  "The plot script (default: scripts/plot_sweep.py above the executable or in the source tree)");
  sub->add_option("--python", a->python,
                  "Python interpreter for the plot (default python3, then /usr/bin/python3 if that one lacks "
                  "matplotlib)")->capture_default_str();
  sub->add_flag("--no-plot", a->no_plot, "Write only sweep.json and sweep.md");
  sub->add_flag("--json", a->json, "Print the JSON array instead of the markdown table");
  sub->add_flag("--allow-unsupported", a->allow_unsupported, "Run an unsupported architecture as llama (experimental)");
  sub->footer(
      "Exit code 3: the results (sweep.json, sweep.md) are written but the plot failed; it needs python3 with "
      "matplotlib (Debian: apt-get install python3-matplotlib).");
  return [a] { return run(*a); };
}

}  // namespace tq::cli
