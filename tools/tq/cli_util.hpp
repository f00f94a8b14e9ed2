// Small parsing helpers shared by the tq subcommands (comma lists, integers
// with errors that name the flag and the bad token).
#pragma once

#include <string>
#include <vector>

namespace tq::cli {

// What the commands that run a model (generate, eval) keep dense in every
// compressed cache unless told otherwise: the newest 128 tokens and the first
// 4 (the attention sinks). docs/quality.md, "Results with a dense window and a
// dense prefix": on SmolLM2-135M they take turbo4's KL from 0.048 to 0.002,
// for a fixed 132 dense tokens per layer and KV head (+4.6 % over turbo4's
// bytes at 8K tokens of context, +1.2 % at 32K). --dense-window 0
// --dense-prefix 0 measures the formats alone.
constexpr int kDefaultDenseWindow = 128;
constexpr int kDefaultDensePrefix = 4;

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
// With `local` (a model's per-layer sliding-window flags), the names "local"
// and "global" stand for all of its sliding-window / full-attention layers.
std::vector<int> parse_layer_list(const std::string& flag, const std::string& s, int n_layers,
                                  const std::vector<char>* local = nullptr);

}  // namespace tq::cli
