// Subcommands of the tq tool. Each registers itself on the CLI11 app and
// returns the callback that runs it (exit code).
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

#include "turboquant/eval.hpp"
#include "turboquant/tokenizer.hpp"

namespace tq::cli {

using Runner = std::function<int()>;

Runner add_distortion(CLI::App& app);
Runner add_formats(CLI::App& app);
Runner add_kv_bench(CLI::App& app);
Runner add_kv_presets(CLI::App& app);
Runner add_gguf_info(CLI::App& app);
Runner add_models(CLI::App& app);
Runner add_generate(CLI::App& app);
Runner add_logits(CLI::App& app);
Runner add_model_bench(CLI::App& app);
Runner add_eval(CLI::App& app);
Runner add_gpu_bench(CLI::App& app);
Runner add_sweep(CLI::App& app);

// Shared by eval and sweep (defined in cmd_eval.cpp).
// --text: "prose" / "code" (the installed defaults) or a file path.
EvalText load_eval_text(const std::string& arg);
// The text's ids (no BOS), the first max_tokens of them (0: all); the text is
// cut first so that a long book is not tokenized whole.
std::vector<int32_t> eval_tokens(const Tokenizer& tok, EvalText& text, int max_tokens);
// A progress bar on stderr, "[####....] 42.0% done/total unit, s, ETA"; empty
// (no output) when stderr is not a terminal.
std::function<void(size_t done, size_t total)> progress_bar(const char* unit);

}  // namespace tq::cli
