// refit: the command-line program. Each subcommand registers itself on the CLI11 app.
#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <csignal>
#include <cstdio>
#include <exception>

#include "apps/commands.hpp"

namespace {

// SIGINT/SIGTERM must not kill `refit serve` with the default action while it starts (exit 143): block them
// before anything else runs. .preinit_array runs before any shared library's initializers (libtorch's take a
// while); only the dynamic loader's own mapping comes earlier. main() unblocks them for the other commands.
void block_stop_signals(int, char**, char**) {
  const sigset_t s = refit::apps::stop_signal_set();
  sigprocmask(SIG_BLOCK, &s, nullptr);
}
__attribute__((section(".preinit_array"), used)) void (*const block_stop_signals_early)(int, char**, char**) = block_stop_signals;

void unblock_stop_signals() {
  const sigset_t s = refit::apps::stop_signal_set();
  sigprocmask(SIG_UNBLOCK, &s, nullptr);
}

}  // namespace

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
  refit::apps::add_worker_commands(app, commands);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    unblock_stop_signals();
    return app.exit(e);
  }
  try {
    for (auto& [sub, run] : commands)
      if (sub->parsed()) {
        // `serve` and `worker` wait for them with sigwait and shut down in order; every other command dies as usual.
        if (sub->get_name() != "serve" && sub->get_name() != "worker") unblock_stop_signals();
        return run();
      }
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
  return 2;
}
