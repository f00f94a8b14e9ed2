// tq: the turboquant command-line tool.
#include <cstdio>
#include <map>

#include "commands.hpp"
#include "turboquant/error.hpp"
#include "turboquant/simd.hpp"
#include "turboquant/version.hpp"

int main(int argc, char** argv) {
  CLI::App app{"tq: KV-cache compression with TurboQuant (rotation + Lloyd-Max codes, QJL, PolarQuant)"};
  app.set_version_flag("--version", std::string("tq ") + tq::kVersion);
  app.require_subcommand(1);
  std::string simd;
  app.add_option("--simd", simd, "Force a CPU kernel path: scalar, avx2, avx512 (default: best)")
      ->check(CLI::IsMember({"scalar", "avx2", "avx512"}));

  std::map<CLI::App*, tq::cli::Runner> runners;
  auto reg = [&](tq::cli::Runner (*add)(CLI::App&)) {
    const size_t before = app.get_subcommands({}).size();
    tq::cli::Runner r = add(app);
    runners[app.get_subcommands({})[before]] = std::move(r);
  };
  reg(tq::cli::add_distortion);
  reg(tq::cli::add_formats);
  reg(tq::cli::add_kv_bench);
  reg(tq::cli::add_kv_presets);
  reg(tq::cli::add_gguf_info);
  reg(tq::cli::add_models);
  reg(tq::cli::add_generate);
  reg(tq::cli::add_logits);
  reg(tq::cli::add_model_bench);
  reg(tq::cli::add_eval);
  reg(tq::cli::add_gpu_bench);
  reg(tq::cli::add_sweep);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (!simd.empty()) tq::set_simd_level(tq::parse_simd_level(simd));
    for (auto& [sub, run] : runners)
      if (sub->parsed()) return run();
  } catch (const tq::Error& e) {
    std::fprintf(stderr, "tq: error: %s\n", e.what());
    return 2;
  }
  return 1;
}
