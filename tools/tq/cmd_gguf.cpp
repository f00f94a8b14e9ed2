// tq gguf-info: what a GGUF file holds (metadata, tensors, types).
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "turboquant/gguf.hpp"

namespace tq::cli {
namespace {

struct Args {
  std::string path;
  bool tensors = false;
  bool json = false;
};

std::string short_value(const gguf::Value& v) {
  switch (v.type) {
    case gguf::ValueType::string: return v.s.size() > 60 ? "\"" + v.s.substr(0, 57) + "...\"" : "\"" + v.s + "\"";
    case gguf::ValueType::array:
      return "[" + std::to_string(v.items.size()) + " x " + gguf::to_string(v.elem) + "]";
    case gguf::ValueType::f32:
    case gguf::ValueType::f64: return std::to_string(v.f);
    default: return std::to_string(v.as_int());
  }
}

int run(const Args& a) {
  const gguf::File f = gguf::File::open(a.path);
  std::map<std::string, std::pair<size_t, uint64_t>> by_type;  // count, bytes
  uint64_t total = 0;
  for (const auto& t : f.tensors()) {
    auto& e = by_type[ggml::to_string(t.type)];
    ++e.first;
    e.second += t.bytes;
    total += t.bytes;
  }
  if (a.json) {
    nlohmann::json j;
    j["path"] = a.path;
    j["version"] = f.version();
    j["n_tensors"] = f.tensors().size();
    j["tensor_bytes"] = total;
    for (const auto& [k, v] : f.metadata()) j["metadata"][k] = short_value(v);
    for (const auto& [k, v] : by_type) j["types"][k] = {{"tensors", v.first}, {"bytes", v.second}};
    if (a.tensors)
      for (const auto& t : f.tensors())
        j["tensors"].push_back({{"name", t.name}, {"type", ggml::to_string(t.type)}, {"dims", t.dims},
                                {"bytes", t.bytes}});
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("%s: GGUF v%u, %zu tensors, %.1f MiB of tensor data, alignment %llu\n", a.path.c_str(),
              f.version(), f.tensors().size(), total / 1048576.0,
              static_cast<unsigned long long>(f.alignment()));
  for (const auto& [k, v] : by_type)
    std::printf("  %-6s %4zu tensors %10.1f MiB\n", k.c_str(), v.first, v.second / 1048576.0);
  for (const auto& [k, v] : f.metadata()) std::printf("  %-45s %s\n", k.c_str(), short_value(v).c_str());
  if (a.tensors)
    for (const auto& t : f.tensors()) {
      std::string dims;
      for (auto d : t.dims) dims += (dims.empty() ? "" : " x ") + std::to_string(d);
      std::printf("  %-40s %-5s %s\n", t.name.c_str(), ggml::to_string(t.type).c_str(), dims.c_str());
    }
  return 0;
}

}  // namespace

Runner add_gguf_info(CLI::App& app) {
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand("gguf-info", "Show the metadata and tensors of a GGUF file");
  sub->add_option("file", a->path, "GGUF file")->required()->check(CLI::ExistingFile);
  sub->add_flag("--tensors", a->tensors, "List every tensor");
  sub->add_flag("--json", a->json, "Print one JSON object");
  return [a] { return run(*a); };
}

}  // namespace tq::cli
