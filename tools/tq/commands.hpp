// Subcommands of the tq tool. Each registers itself on the CLI11 app and
// returns the callback that runs it (exit code).
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

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

}  // namespace tq::cli
