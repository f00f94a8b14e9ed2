#include "cli_util.hpp"

#include <sstream>

#include "turboquant/error.hpp"
#include "turboquant/kv_cache.hpp"

namespace tq::cli {

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string t;
  while (std::getline(ss, t, ','))
    if (!t.empty()) out.push_back(t);
  return out;
}

std::vector<std::string> split_presets(const std::string& s) {
  std::vector<std::string> out;
  for (const auto& piece : split_list(s)) {
    // A layer policy follows its base preset: "turbo3+global=turbo4-out".
    const std::string base = piece.substr(0, piece.find('+'));
    bool starts = out.empty() || base.rfind("k=", 0) == 0 || base == "paper_prod_qjl";
    for (const auto& p : kv_presets()) starts = starts || base == p.name;
    if (starts) out.push_back(piece);
    else out.back() += "," + piece;
  }
  return out;
}

int parse_int(const std::string& flag, const std::string& token) {
  size_t pos = 0;
  int v = 0;
  try {
    v = std::stoi(token, &pos);
  } catch (...) {
    pos = 0;
  }
  TQ_REQUIRE(pos == token.size() && !token.empty(), flag, ": '", token, "' is not an integer");
  return v;
}

std::vector<int> parse_int_list(const std::string& flag, const std::string& s) {
  std::vector<int> out;
  for (const auto& t : split_list(s)) out.push_back(parse_int(flag, t));
  TQ_REQUIRE(!out.empty(), flag, ": empty list");
  return out;
}

std::vector<int> parse_layer_list(const std::string& flag, const std::string& s, int n_layers,
                                  const std::vector<char>* local) {
  std::vector<int> out;
  for (const auto& t : split_list(s)) {
    if (local && (t == "local" || t == "global")) {
      for (int l = 0; l < n_layers && l < int(local->size()); ++l)
        if (bool((*local)[size_t(l)]) == (t == "local")) out.push_back(l);
      continue;
    }
    int v = parse_int(flag, t);
    if (v < 0) v += n_layers;  // -1 = last layer
    TQ_REQUIRE(v >= 0 && v < n_layers, flag, ": layer ", t, " is outside 0..", n_layers - 1);
    out.push_back(v);
  }
  return out;
}

}  // namespace tq::cli
