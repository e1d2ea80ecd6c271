// refit: the command-line program. Each subcommand registers itself on the CLI11 app.
#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <exception>

#include "apps/commands.hpp"

int main(int argc, char** argv) {
  auto logger = spdlog::stderr_color_mt("refit");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");

  CLI::App app{"refit: a diffusion-serving engine with transactional hot weight updates"};
  app.require_subcommand(1);
  app.set_version_flag("--version", [] { return refit::apps::build_info(); });
  refit::apps::command_registry commands;
  refit::apps::add_weight_commands(app, commands);
  refit::apps::add_pipeline_commands(app, commands);
  refit::apps::add_serve_commands(app, commands);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto& [sub, run] : commands)
      if (sub->parsed()) return run();
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
  return 2;
}
