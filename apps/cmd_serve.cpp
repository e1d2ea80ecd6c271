// `refit serve`: the engine behind the HTTP API (and, with --actor-port, CAF's middleman).
#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <pthread.h>

#include <csignal>
#include <exception>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include "actors/client_gateway.hpp"
#include "actors/engine.hpp"
#include "apps/commands.hpp"
#include "net/http_bridge.hpp"
#include "net/remote.hpp"
#include "pipeline/models/placement.hpp"
#include "pipeline/weights/hf_cache.hpp"

namespace refit::apps {

namespace fs = std::filesystem;

namespace {

struct serve_args {
  std::string model_path, host = "127.0.0.1", port_file, device = "cpu", dtype, api_key;
  int port = 30010;
  int workers = 1;
  std::vector<std::string> allowed_roots;
  std::optional<int> actor_port;
  size_t max_request_bytes = 1 << 20;
  int image_url_ttl = 600;
  uint64_t image_store_mb = 256;
  bool dit_layerwise_offload = false;
  double dit_offload_prefetch_size = 1;
  double weight_sync_timeout = 600;
};

// libtorch's gloo throws on its own I/O threads when a trainer sends more bytes than it announced, which
// ends the process (torch's Python ranks die the same way); at least the log says why.
[[noreturn]] void log_and_abort() {
  std::string what = "no exception";
  if (auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      what = x.what();
    } catch (...) {
      what = "an exception that is not a std::exception";
    }
  }
  spdlog::critical("refit serve: terminating on an uncaught exception: {}", what);
  if (what.find("Received data size doesn't match expected size") != std::string::npos)
    spdlog::critical("refit serve: a trainer broadcast more bytes than its update_weights_from_distributed request announced "
                     "(names, dtypes and shapes must describe exactly what it sends)");
  spdlog::default_logger()->flush();
  std::abort();
}

// Written whole and renamed into place, so a poller never reads a half-written number.
void write_port_file(const std::string& path, uint16_t port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << port << "\n";
    if (!out.flush()) throw std::runtime_error("cannot write --port-file " + tmp);
  }
  fs::rename(tmp, path);
}

int serve(const serve_args& a) {
  // Before any thread exists, so every thread (CAF's, httplib's, libtorch's) inherits the mask and
  // the signals reach only the sigwait below. SIGPIPE: a client that hangs up must not kill us.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  std::set_terminate(log_and_abort);
  if (a.workers < 1) throw std::invalid_argument("--workers must be at least 1");
  try {
    models::parse_placement(a.device, a.dtype);  // a typo should stop the server before it loads for minutes
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("--") + e.what());
  }
  if (a.port < 0 || a.port > 65535) throw std::invalid_argument("--port must be 0..65535");
  if (a.actor_port && (*a.actor_port < 0 || *a.actor_port > 65535)) throw std::invalid_argument("--actor-port must be 0..65535");

  // Fail on a mistyped root before spending minutes loading a large model.
  net::model_root_policy{std::vector<fs::path>(a.allowed_roots.begin(), a.allowed_roots.end())};

  const std::string model_path = weights::resolve_model_path(a.model_path);  // a Hugging Face id: its cached snapshot
  if (model_path != a.model_path) spdlog::info("refit serve: {} is {} in the Hugging Face cache", a.model_path, model_path);
  net::remote_system_config cfg;
  caf::actor_system sys{cfg};
  const std::vector<std::string> devices(static_cast<size_t>(a.workers), a.device);
  spdlog::info("refit serve: loading {} on {} worker(s) ({}, dtype {})", a.model_path, a.workers, a.device,
               a.dtype.empty() ? "default" : a.dtype);
  if (a.dit_layerwise_offload)
    spdlog::info("refit serve: layerwise offload of the DiT's blocks, prefetch {}", a.dit_offload_prefetch_size);
  const auto sync_timeout = std::chrono::milliseconds(static_cast<int64_t>(a.weight_sync_timeout * 1000));
  auto scheduler =
      actors::spawn_engine(sys, {model_path, devices, a.dtype, a.dit_layerwise_offload, a.dit_offload_prefetch_size, sync_timeout});
  caf::scoped_actor self{sys};
  // Whatever goes wrong from here, the engine must not outlive this function (the actor system's
  // destructor would wait for it forever).
  struct stop_on_exit {
    caf::scoped_actor& self;
    msg::scheduler_actor& scheduler;
    ~stop_on_exit() { self->send_exit(scheduler, caf::exit_reason::user_shutdown); }
  } engine_guard{self, scheduler};

  // The actor port publishes only the client API, through a gateway that forwards nothing else.
  std::optional<uint16_t> actor_port;
  msg::client_api_actor gateway;
  if (a.actor_port) {
    gateway = actors::spawn_client_gateway(sys, scheduler);
    actor_port = net::publish_client_api(gateway, a.host, static_cast<uint16_t>(*a.actor_port));
    spdlog::info("refit serve: actor port {} (client API only)", *actor_port);
  }

  net::http_bridge_config hc;
  hc.host = a.host;
  hc.port = static_cast<uint16_t>(a.port);
  hc.api_key = a.api_key;
  hc.allowed_model_roots.assign(a.allowed_roots.begin(), a.allowed_roots.end());
  hc.max_request_bytes = a.max_request_bytes;
  hc.image_url_ttl = std::chrono::seconds(a.image_url_ttl);
  hc.image_store_bytes = a.image_store_mb << 20;
  auto bridge = net::spawn_http_bridge(sys, scheduler, hc);
  self->monitor(scheduler);
  self->monitor(bridge.actor);
  std::string roots;
  for (const auto& r : a.allowed_roots) roots += (roots.empty() ? "" : ", ") + r;
  spdlog::info("refit serve: model {}, {} worker(s) on {}, api key {}, allowed model roots: {}, max request {} bytes", a.model_path,
               a.workers, a.device, a.api_key.empty() ? "off" : "on", roots.empty() ? "any" : roots, a.max_request_bytes);
  spdlog::info("refit serve: listening on http://{}:{}", a.host, bridge.port);
  if (!a.port_file.empty()) write_port_file(a.port_file, bridge.port);

  // The signal waiter only forwards; shutting down happens here, in order.
  std::thread signal_waiter([&stop_signals, main = caf::actor_cast<caf::actor>(self)] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    caf::anon_send(main, msg::done_atom::value, static_cast<int32_t>(sig));
  });
  int exit_code = 0;
  bool stopping = false, bridge_down = false;
  auto on_down = [&](caf::down_msg& dm) {
    const bool is_bridge = dm.source == bridge.actor.address();
    bridge_down |= is_bridge;
    if (stopping) return;
    spdlog::error("refit serve: {} stopped unexpectedly ({})", is_bridge ? "the HTTP bridge" : "the scheduler", caf::to_string(dm.reason));
    exit_code = 1;
    stopping = true;
    pthread_kill(signal_waiter.native_handle(), SIGTERM);  // still blocked everywhere, so it lands in sigwait
  };
  while (!stopping)
    self->receive(
        [&](msg::done_atom, int32_t sig) {
          if (stopping) return;
          spdlog::info("refit serve: {} received, shutting down", strsignal(sig));
          stopping = true;
        },
        on_down);
  signal_waiter.join();

  // HTTP first: its in-flight requests still need the scheduler; then the engine (engine_guard).
  if (!bridge_down) {
    self->send_exit(bridge.actor, caf::exit_reason::user_shutdown);
    while (!bridge_down) self->receive(on_down, [](msg::done_atom, int32_t) {});
  }
  if (actor_port) net::unpublish_client_api(gateway, *actor_port);
  spdlog::info("refit serve: HTTP server stopped; stopping the engine");
  return exit_code;
}

}  // namespace

void add_serve_commands(CLI::App& app, command_registry& commands) {
  auto a = std::make_shared<serve_args>();
  auto* cmd = app.add_subcommand("serve", "Serve a diffusion pipeline checkpoint over HTTP with transactional hot weight updates");
  cmd->add_option("--model-path", a->model_path,
                  "Diffusers-layout checkpoint to serve: a folder, or a Hugging Face id (org/name) in the local hub cache")
      ->required();
  cmd->add_option("--host", a->host, "Address the HTTP server (and --actor-port) binds")->capture_default_str();
  cmd->add_option("--port", a->port, "HTTP port; 0 binds an ephemeral port (see --port-file)")->capture_default_str();
  cmd->add_option("--port-file", a->port_file, "Write the bound HTTP port (decimal, newline) to this file once serving");
  cmd->add_option("--workers", a->workers, "Data-parallel workers (model replicas), each on --device")->capture_default_str();
  cmd->add_option("--device", a->device, "cpu, cuda or cuda:N")->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)");
  cmd->add_option("--api-key", a->api_key, "Require 'Authorization: Bearer KEY' on the weight endpoints (default: off)")
      ->envname("REFIT_API_KEY");
  cmd->add_option("--allowed-model-root", a->allowed_roots,
                  "Directory update checkpoints must lie in, after resolving symlinks and '..'; repeatable (default: any path)");
  cmd->add_option("--actor-port", a->actor_port, "Publish the client API (generate, update, checksum, info, stats) to CAF remote clients on this port; 0: ephemeral (default: off)");
  cmd->add_option("--max-request-bytes", a->max_request_bytes, "Larger request bodies are refused with 413")->capture_default_str();
  cmd->add_option("--image-url-ttl", a->image_url_ttl,
                  "Seconds the images of a response_format \"url\" reply stay fetchable at /v1/images/<id>/content")
      ->capture_default_str()
      ->check(CLI::Range(1, 7 * 24 * 3600));
  cmd->add_option("--image-store-mb", a->image_store_mb, "MiB of such images kept at most (oldest dropped first)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--weight-sync-timeout", a->weight_sync_timeout,
                  "Seconds to wait for a trainer: joining its torch.distributed group (init_weights_update_group), and each "
                  "broadcast of a distributed update; past it the update fails and the group is left")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 86400.0));
  add_offload_options(*cmd, a->dit_layerwise_offload, a->dit_offload_prefetch_size);
  commands.emplace_back(cmd, [a] { return serve(*a); });
}

}  // namespace refit::apps
