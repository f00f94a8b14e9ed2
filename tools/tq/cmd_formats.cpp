// tq formats: parse spec strings and show their exact storage cost.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "turboquant/error.hpp"
#include "turboquant/format.hpp"

namespace tq::cli {
namespace {

struct Args {
  std::vector<std::string> specs;
  std::vector<int> dims{64, 128, 256};
  bool json = false;
};

int run(const Args& a) {
  std::vector<std::string> specs = a.specs;
  if (specs.empty())
    specs = {"tq-mse:b=2", "tq-mse:b=2.5", "tq-mse:b=3", "tq-mse:b=3.5", "tq-mse:b=4",
             "tq-prod:b=3", "tq-prod:b=4", "polar"};
  nlohmann::json out = nlohmann::json::array();
  if (!a.json)
    std::printf("%-28s %5s %7s %7s %7s %7s %8s %9s\n", "format", "dim", "codes", "sketch", "scales",
                "bytes", "b/coord", "vs bf16");
  for (const auto& s : specs) {
    const FormatSpec f = parse_format(s);
    for (int d : a.dims) {
      const RecordBytes r = record_bytes(f, d);
      const double ratio = 2.0 * d / double(r.total());
      if (a.json) {
        out.push_back({{"format", to_string(f)}, {"dim", d}, {"codes", r.codes},
                       {"sketch", r.sketch}, {"scales", r.scales}, {"bytes", r.total()},
                       {"bits_per_coord", bits_per_coord(f, d)}, {"ratio_vs_bf16", ratio}});
      } else {
        std::printf("%-28s %5d %7zu %7zu %7zu %7zu %8.3f %8.2fx\n", to_string(f).c_str(), d,
                    r.codes, r.sketch, r.scales, r.total(), bits_per_coord(f, d), ratio);
      }
    }
  }
  if (a.json) std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

}  // namespace

Runner add_formats(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand(
      "formats", "Parse format spec strings and print bytes per vector by component");
  sub->add_option("specs", a->specs, "Format specs, e.g. tq-mse:b=3 tq-prod:b=3,m=128 polar");
  sub->add_option("--dim", a->dims, "Dimensions (repeatable)")->check(CLI::Range(8, 16384));
  sub->add_flag("--json", a->json, "Print one JSON array of objects");
  return [a] { return run(*a); };
}

}  // namespace tq::cli

#include "turboquant/kv_cache.hpp"

namespace tq::cli {
namespace {

struct PresetArgs {
  std::vector<int> dims{64, 128, 256};
  bool json = false;
};

int run_presets(const PresetArgs& a) {
  nlohmann::json out = nlohmann::json::array();
  if (!a.json)
    std::printf("%-13s %-24s %-22s %5s %8s %8s %9s  %s\n", "preset", "K", "V", "dim", "K+V B",
                "b/coord", "vs bf16", "description");
  for (const auto& p : kv_presets())
    for (int d : a.dims) {
      const FormatSpec k = parse_format(p.k_spec), v = parse_format(p.v_spec);
      bool ok = true;
      try {
        validate_format(k, d);
        validate_format(v, d);
      } catch (const Error&) {
        ok = false;
      }
      if (!ok) continue;
      const size_t bytes = bytes_per_vector(k, d) + bytes_per_vector(v, d);
      const double ratio = 4.0 * d / double(bytes);
      if (a.json) {
        out.push_back({{"preset", p.name}, {"k", p.k_spec}, {"v", p.v_spec}, {"dim", d},
                       {"bytes_per_token_per_head", bytes}, {"bits_per_coord", 4.0 * bytes / d},
                       {"ratio_vs_bf16", ratio}, {"description", p.description}});
      } else {
        std::printf("%-13s %-24s %-22s %5d %8zu %8.3f %8.2fx  %s\n", p.name.c_str(), p.k_spec.c_str(),
                    p.v_spec.c_str(), d, bytes, 4.0 * bytes / d, ratio, p.description.c_str());
      }
    }
  if (a.json) std::printf("%s\n", out.dump(2).c_str());
  else
    std::printf("\nAny preset (or k=SPEC/v=SPEC) takes a layer policy: PRESET+LAYERS=PRESET[+...], LAYERS a comma "
                "list of layer indices (negative: from the end) or 'global' / 'local' (a model's full-attention / "
                "sliding-window layers); e.g. turbo3+global=turbo4-out.\n");
  return 0;
}

}  // namespace

Runner add_kv_presets(CLI::App& app) {
  auto a = std::make_shared<PresetArgs>();
  CLI::App* sub = app.add_subcommand(
      "kv-presets", "List the KV-cache presets with exact bytes per token per KV head (K+V, scales included)");
  sub->add_option("--dim", a->dims, "Head dimensions (repeatable)")->check(CLI::Range(8, 16384));
  sub->add_flag("--json", a->json, "Print one JSON array of objects");
  return [a] { return run_presets(*a); };
}

}  // namespace tq::cli
