// Small parsing helpers shared by the tq subcommands (comma lists, integers
// with errors that name the flag and the bad token).
#pragma once

#include <string>
#include <vector>

namespace tq::cli {

// "a,b,,c" -> {"a", "b", "c"}
std::vector<std::string> split_list(const std::string& s);
// A whole-string integer, or tq::Error naming the flag and the token.
int parse_int(const std::string& flag, const std::string& token);
std::vector<int> parse_int_list(const std::string& flag, const std::string& s);
// Layer indices; negative counts from the end (-1 = last layer); checked against n_layers.
std::vector<int> parse_layer_list(const std::string& flag, const std::string& s, int n_layers);

}  // namespace tq::cli
