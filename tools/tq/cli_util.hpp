// Small parsing helpers shared by the tq subcommands (comma lists, integers
// with errors that name the flag and the bad token).
#pragma once

#include <string>
#include <vector>

namespace tq::cli {

// "a,b,,c" -> {"a", "b", "c"}
std::vector<std::string> split_list(const std::string& s);
// A comma list of KV presets, where a custom "k=SPEC/v=SPEC" may itself
// contain commas: a piece starts a new preset only if it is a known preset
// name or begins with "k=" (e.g. "turbo4,k=tq-mse:b=4,scale=ls/v=q8_0").
std::vector<std::string> split_presets(const std::string& s);
// A whole-string integer, or tq::Error naming the flag and the token.
int parse_int(const std::string& flag, const std::string& token);
std::vector<int> parse_int_list(const std::string& flag, const std::string& s);
// Layer indices; negative counts from the end (-1 = last layer); checked against n_layers.
std::vector<int> parse_layer_list(const std::string& flag, const std::string& s, int n_layers);

}  // namespace tq::cli
