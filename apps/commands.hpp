#pragma once

#include <CLI/CLI.hpp>

#include <csignal>
#include <cmath>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "pipeline/models/compute_tuning.hpp"

namespace refit::apps {

// Each subcommand with the function that runs it once parsed; it returns the exit code.
using command_registry = std::vector<std::pair<CLI::App*, std::function<int()>>>;

void add_weight_commands(CLI::App& app, command_registry& commands);    // inspect, checksum
void add_pipeline_commands(CLI::App& app, command_registry& commands);  // make-model, generate
void add_serve_commands(CLI::App& app, command_registry& commands);     // serve
void add_worker_commands(CLI::App& app, command_registry& commands);    // worker

// The worker secret in `path` (its first line; at least 16 characters; the file must not be readable by group
// or others). Throws std::invalid_argument naming --worker-secret-file.
std::string read_worker_secret(const std::string& path);

std::string build_info();

// SIGINT and SIGTERM: blocked in every thread from the start (main.cpp); `serve` and `worker` wait for them with sigwait.
inline sigset_t stop_signal_set() {
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGINT);
  sigaddset(&s, SIGTERM);
  return s;
}

// For a command that stops on those signals: blocks them in this thread (so in every thread it starts, which inherit
// the mask; only its sigwait gets them) and ignores SIGPIPE (a peer that hangs up must not kill it). Returns the set.
inline sigset_t wait_for_stop_signals_only() {
  const sigset_t s = stop_signal_set();
  pthread_sigmask(SIG_BLOCK, &s, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
  return s;
}

// --dit-layerwise-offload and --dit-offload-prefetch-size, shared by serve and generate.
inline void add_offload_options(CLI::App& cmd, bool& offload, double& prefetch) {
  auto* flag = cmd.add_flag("--dit-layerwise-offload", offload,
                            "Keep the DiT's blocks in (pinned) host memory and copy each to the device shortly "
                            "before it runs");
  cmd.add_option("--dit-offload-prefetch-size", prefetch,
                 "With --dit-layerwise-offload: blocks copied ahead of the running one (a whole number >= 1), or a fraction "
                 "(0, 1) of all blocks; device memory holds prefetch + 1 blocks")
      ->capture_default_str()
      ->check([](const std::string& v) -> std::string {
        double x = 0;
        try {
          x = std::stod(v);
        } catch (const std::exception&) {
          return "must be a number";
        }
        if (!(x > 0)) return "must be greater than 0";
        if (!std::isfinite(x) || x > 1e6) return "must be a finite number of blocks (at most 1000000)";
        if (x >= 1 && x != std::floor(x)) return "must be a whole number when 1 or more";
        return {};
      })
      ->needs(flag);
}

// The first GPU of a worker device list ("cpu" when none): where the attention kernel order is settled.
inline std::string first_gpu(const std::vector<std::string>& devices) {
  for (const auto& d : devices)
    if (d.rfind("cuda", 0) == 0) return d;
  return "cpu";
}

// --attention-backend, shared by serve, worker and generate: how a GPU computes attention, not what.
inline void add_compute_tuning_options(CLI::App& cmd, models::compute_tuning& t) {
  cmd.add_option("--attention-backend", t.attention,
                 "The fused attention kernel tried first on a GPU: cudnn, flash, efficient or math (one that cannot take a "
                 "call passes it on); auto = PyTorch's order (cuDNN first on Hopper/Blackwell, flash elsewhere)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "cudnn", "flash", "efficient", "math"}));
}

}  // namespace refit::apps
