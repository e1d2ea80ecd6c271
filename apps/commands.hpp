#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace refit::apps {

// Each subcommand with the function that runs it once parsed; it returns the exit code.
using command_registry = std::vector<std::pair<CLI::App*, std::function<int()>>>;

void add_weight_commands(CLI::App& app, command_registry& commands);    // inspect, checksum
void add_pipeline_commands(CLI::App& app, command_registry& commands);  // make-model, generate
void add_serve_commands(CLI::App& app, command_registry& commands);     // serve

std::string build_info();

}  // namespace refit::apps
