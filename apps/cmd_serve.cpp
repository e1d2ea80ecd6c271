// `refit serve`: the engine behind the HTTP API (and, with --actor-port, CAF's middleman).
#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <pthread.h>

#include <csignal>
#include <cstdlib>
#include <exception>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
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
  std::string model_path, host = "127.0.0.1", port_file, device = "cpu", devices, dtype, api_key;
  int port = 30010;
  int workers = 1;
  std::vector<std::string> allowed_roots;
  bool check_finite = true;
  bool read_once = true;
  std::optional<int> actor_port;
  std::string actor_host = "127.0.0.1", actor_tls_cert, actor_tls_key, actor_tls_ca, worker_secret_file;
  uint64_t actor_max_message_mb = 16, actor_max_buffered_mb = 256;
  size_t max_request_bytes = 1 << 20;
  int image_url_ttl = 600;
  uint64_t image_store_mb = 256;
  bool dit_layerwise_offload = false;
  double dit_offload_prefetch_size = 1;
  models::compute_tuning tuning;
  double weight_sync_timeout = 600;
  double shutdown_timeout = 30;
  double http_read_timeout = 30;
  size_t max_queued_requests = 256;
  size_t max_connections = 4096;
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

// Asks the HTTP bridge to stop accepting and wait up to `wait_ms` for the requests it serves; how many still run.
uint64_t drain_http(caf::scoped_actor& self, const msg::http_bridge_actor& bridge, int64_t wait_ms) {
  uint64_t still = 0;
  self->request(bridge, std::chrono::milliseconds(wait_ms + 30000), msg::shutdown_atom::value, wait_ms)
      .receive([&](uint64_t n) { still = n; }, [&](caf::error& e) { spdlog::warn("refit serve: stopping HTTP: {}", caf::to_string(e)); });
  return still;
}

// The actor port lets peers update weights: off loopback it must authenticate them (mutual TLS).
net::actor_port_tls check_actor_port_options(const serve_args& a) {
  net::actor_port_tls tls{a.actor_tls_cert, a.actor_tls_key, a.actor_tls_ca};
  if (!a.actor_port) {
    if (tls.enabled()) throw std::invalid_argument("--actor-tls-cert, --actor-tls-key and --actor-tls-ca need --actor-port");
    return tls;
  }
  if (a.actor_max_buffered_mb < a.actor_max_message_mb)
    throw std::invalid_argument("--actor-max-buffered-mb must be at least --actor-max-message-mb");
  if (!tls.enabled() && !net::is_loopback_host(a.actor_host))
    throw std::invalid_argument("--actor-host " + a.actor_host +
                                " is not a loopback address: the actor port accepts weight updates, so off loopback it requires mutual "
                                "TLS; give --actor-tls-cert, --actor-tls-key and --actor-tls-ca (PEM: the server's certificate, its "
                                "key, the cluster CA that signs every client's certificate)");
  if (tls.enabled()) net::check_actor_port_tls(tls, "--actor-tls-");
  return tls;
}

int serve(const serve_args& a) {
  // Before any thread exists, so every thread (CAF's, the HTTP server's, libtorch's) inherits the mask and
  // the signals reach only the sigwait below. SIGPIPE: a client that hangs up must not kill us.
  sigset_t stop_signals = wait_for_stop_signals_only();
  // The signal waiter only forwards once serving; shutting down happens below, in order. A stop signal
  // during start-up (loading can take minutes) ends the process at once: nothing is served yet.
  struct signal_target {
    std::mutex m;
    caf::actor main;
    bool abandoned = false;  // serve() is leaving by an exception
  };
  auto target = std::make_shared<signal_target>();
  std::thread signal_waiter([&stop_signals, target] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    std::lock_guard lock(target->m);
    if (target->abandoned) return;
    if (!target->main) {
      spdlog::info("refit serve: {} received while starting; exiting before serving anything", strsignal(sig));
      spdlog::default_logger()->flush();
      std::_Exit(0);
    }
    caf::anon_send(target->main, msg::done_atom::value, static_cast<int32_t>(sig));
  });
  struct join_waiter {
    std::thread& t;
    signal_target& target;
    ~join_waiter() {
      if (!t.joinable()) return;
      {
        std::lock_guard lock(target.m);
        target.abandoned = true;
      }
      pthread_kill(t.native_handle(), SIGTERM);  // blocked everywhere, so it lands in sigwait
      t.join();
    }
  } waiter_guard{signal_waiter, *target};

  std::set_terminate(log_and_abort);
  if (a.workers < 1) throw std::invalid_argument("--workers must be at least 1");
  // One worker per device of --devices, or --workers replicas on --device. A typo should stop the server
  // before it loads for minutes.
  std::vector<std::string> devices;
  try {
    if (!a.devices.empty()) {
      devices = models::parse_device_list(a.devices, a.dtype);
    } else {
      models::parse_placement(a.device, a.dtype);
      devices.assign(static_cast<size_t>(a.workers), a.device);
    }
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("--") + e.what());
  }
  std::string device_names;
  for (const auto& d : devices) device_names += (device_names.empty() ? "" : ",") + d;
  if (a.port < 0 || a.port > 65535) throw std::invalid_argument("--port must be 0..65535");
  if (a.actor_port && (*a.actor_port < 0 || *a.actor_port > 65535)) throw std::invalid_argument("--actor-port must be 0..65535");
  const net::actor_port_tls actor_tls = check_actor_port_options(a);

  // Fail on a mistyped root before spending minutes loading a large model.
  net::model_root_policy{std::vector<fs::path>(a.allowed_roots.begin(), a.allowed_roots.end())};

  const std::string model_path = weights::resolve_model_path(a.model_path);  // a Hugging Face id: its cached snapshot
  if (model_path != a.model_path) spdlog::info("refit serve: {} is {} in the Hugging Face cache", a.model_path, model_path);
  net::remote_system_config cfg{actor_tls};
  caf::actor_system sys{cfg};
  spdlog::info("refit serve: loading {} on {} worker(s) ({}, dtype {})", a.model_path, devices.size(), device_names,
               a.dtype.empty() ? "default" : a.dtype);
  models::apply_compute_tuning(a.tuning, first_gpu(devices));
  if (device_names.find("cuda") != std::string::npos) spdlog::info("refit serve: {}", models::describe_compute_tuning());
  if (a.dit_layerwise_offload)
    spdlog::info("refit serve: layerwise offload of the DiT's blocks, prefetch {}", a.dit_offload_prefetch_size);
  const auto sync_timeout = std::chrono::milliseconds(static_cast<int64_t>(a.weight_sync_timeout * 1000));
  actors::engine_config engine{model_path, devices, a.dtype, a.dit_layerwise_offload, a.dit_offload_prefetch_size, sync_timeout};
  engine.allowed_model_roots.assign(a.allowed_roots.begin(), a.allowed_roots.end());  // enforced by the engine, every port
  engine.check_finite = a.check_finite;
  engine.read_once = a.read_once;
  if (!a.worker_secret_file.empty()) {
    if (!a.actor_port) throw std::invalid_argument("--worker-secret-file needs --actor-port (workers join through it)");
    engine.worker_secret = read_worker_secret(a.worker_secret_file);
  }
  spdlog::info("refit serve: weight updates {} non-finite values unless a request says otherwise (--{}check-finite)",
               a.check_finite ? "refuse" : "accept", a.check_finite ? "" : "no-");
  auto scheduler = actors::spawn_engine(sys, engine);
  caf::scoped_actor self{sys};
  // Whatever goes wrong from here, the engine must not outlive this function (the actor system's
  // destructor would wait for it forever).
  struct stop_on_exit {
    caf::scoped_actor& self;
    msg::scheduler_actor& scheduler;
    ~stop_on_exit() { self->send_exit(scheduler, caf::exit_reason::user_shutdown); }
  } engine_guard{self, scheduler};

  // The actor port publishes only the client API (and worker offers, which need the worker secret), through a
  // gateway that forwards nothing else.
  std::optional<uint16_t> actor_port;
  msg::cluster_api_actor gateway;
  std::optional<net::actor_port_endpoint> actor_endpoint;
  if (a.actor_port) {
    gateway = actors::spawn_client_gateway(sys, scheduler);
    const net::actor_port_limits limits{static_cast<size_t>(a.actor_max_message_mb) << 20, static_cast<size_t>(a.actor_max_buffered_mb) << 20};
    actor_endpoint.emplace(sys, limits);
    actor_port = actor_endpoint->publish(gateway, a.actor_host, static_cast<uint16_t>(*a.actor_port));
    spdlog::info("refit serve: actor port {}:{} (client API only; {}; messages up to {} bytes, {} buffered in all)", a.actor_host, *actor_port,
                 actor_endpoint->tls() ? "mutual TLS, peers need a certificate signed by " + actor_tls.ca : "plain TCP, loopback only",
                 limits.max_message_bytes, limits.max_buffered_bytes);
  }

  net::http_bridge_config hc;
  hc.host = a.host;
  hc.port = static_cast<uint16_t>(a.port);
  hc.api_key = a.api_key;
  hc.allowed_model_roots.assign(a.allowed_roots.begin(), a.allowed_roots.end());
  hc.max_request_bytes = a.max_request_bytes;
  hc.image_url_ttl = std::chrono::seconds(a.image_url_ttl);
  hc.image_store_bytes = a.image_store_mb << 20;
  hc.read_timeout = std::chrono::milliseconds(static_cast<int64_t>(a.http_read_timeout * 1000));
  hc.max_connections = a.max_connections;
  hc.max_queued_requests = a.max_queued_requests;
  hc.workers = devices.size();
  auto bridge = net::spawn_http_bridge(sys, scheduler, hc);
  self->monitor(scheduler);
  self->monitor(bridge.actor);
  std::string roots;
  for (const auto& r : a.allowed_roots) roots += (roots.empty() ? "" : ", ") + r;
  spdlog::info("refit serve: model {}, {} worker(s) on {}, api key {}, allowed model roots: {}, max request {} bytes", a.model_path,
               devices.size(), device_names, a.api_key.empty() ? "off" : "on", roots.empty() ? "any" : roots, a.max_request_bytes);
  spdlog::info("refit serve: listening on http://{}:{}", a.host, bridge.port);
  if (!a.port_file.empty()) write_port_file(a.port_file, bridge.port);

  {
    std::lock_guard lock(target->m);
    target->main = caf::actor_cast<caf::actor>(self);
  }
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

  // HTTP first: no new requests; those being served still need the scheduler, for at most
  // --shutdown-timeout; past it the scheduler cancels what runs and answers what waits. Then the engine
  // (engine_guard).
  if (!bridge_down) {
    const auto wait_ms = static_cast<int64_t>(a.shutdown_timeout * 1000);
    auto still = drain_http(self, bridge.actor, wait_ms);
    if (still > 0) {
      spdlog::warn("refit serve: {} request(s) still running after --shutdown-timeout {} s; cancelling them", still, a.shutdown_timeout);
      self->request(scheduler, std::chrono::seconds(30), msg::shutdown_atom::value)
          .receive([](uint64_t cancelled) { spdlog::info("refit serve: {} request(s) cancelled", cancelled); },
                   [](caf::error& e) { spdlog::warn("refit serve: cancelling requests: {}", caf::to_string(e)); });
      still = drain_http(self, bridge.actor, 10000);
      if (still > 0) spdlog::warn("refit serve: {} request(s) did not finish; closing their connections", still);
    }
    self->send_exit(bridge.actor, caf::exit_reason::user_shutdown);
    while (!bridge_down) self->receive(on_down, [](msg::done_atom, int32_t) {});
  }
  if (actor_port) actor_endpoint->unpublish(gateway, *actor_port);
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
  cmd->add_option("--host", a->host, "Address the HTTP server binds (the actor port binds --actor-host)")->capture_default_str();
  cmd->add_option("--port", a->port, "HTTP port; 0 binds an ephemeral port (see --port-file)")->capture_default_str();
  cmd->add_option("--port-file", a->port_file, "Write the bound HTTP port (decimal, newline) to this file once serving");
  cmd->add_option("--workers", a->workers, "Data-parallel workers (model replicas), each on --device")->capture_default_str();
  cmd->add_option("--device", a->device, "cpu, cuda or cuda:N")->capture_default_str();
  cmd->add_option("--devices", a->devices,
                  "One worker per device, each with its own loader and staging ring: a comma-separated list (cuda:0,cuda:1) or "
                  "'all' (every CUDA device); replaces --device and --workers")
      ->excludes("--workers")
      ->excludes("--device");
  cmd->add_option("--dtype", a->dtype, "bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)");
  add_compute_tuning_options(*cmd, a->tuning);
  cmd->add_option("--api-key", a->api_key, "Require 'Authorization: Bearer KEY' on the weight endpoints (default: off)")
      ->envname("REFIT_API_KEY");
  cmd->add_option("--allowed-model-root", a->allowed_roots,
                  "Directory update checkpoints and LoRA adapters must lie in, after resolving symlinks and '..'; every file "
                  "an update reads is opened beneath it (a symlink leading out is refused); repeatable (default: any path)");
  cmd->add_flag("--check-finite,!--no-check-finite", a->check_finite,
                "Weight updates refuse NaN or infinite values (checked on the device while staging; a request's "
                "\"check_finite\" overrides it)")
      ->capture_default_str();
  cmd->add_flag("--read-once,!--no-read-once", a->read_once,
                "With several workers in this process (--devices, --workers): a disk update reads each file once and the other "
                "workers copy the first one's staged weights device to device (NVLink between GPUs)")
      ->capture_default_str();
  cmd->add_option("--actor-port", a->actor_port, "Publish the client API (generate, update, checksum, info, stats) to CAF remote clients on this port; 0: ephemeral (default: off)");
  cmd->add_option("--actor-host", a->actor_host,
                  "Address the actor port binds (independent of --host); one that is not loopback requires --actor-tls-cert, "
                  "--actor-tls-key and --actor-tls-ca")
      ->capture_default_str();
  cmd->add_option("--actor-tls-cert", a->actor_tls_cert,
                  "Mutual TLS on the actor port: the server's certificate chain (PEM), signed by --actor-tls-ca; clients must "
                  "present a certificate signed by the same CA, or are refused before any message is read");
  cmd->add_option("--actor-tls-key", a->actor_tls_key, "The private key of --actor-tls-cert (PEM, unencrypted; keep it mode 600)");
  cmd->add_option("--actor-tls-ca", a->actor_tls_ca, "The cluster CA certificate (PEM) that signs the server's and every client's certificate");
  cmd->add_option("--worker-secret-file", a->worker_secret_file,
                  "Let `refit worker --join` processes that present this secret (the file's first line, >= 16 characters, "
                  "mode 600) join through the actor port as workers (default: nobody may join)");
  cmd->add_option("--actor-max-message-mb", a->actor_max_message_mb,
                  "Largest message a peer may send on the actor port, MiB; a frame announcing more closes its connection")
      ->capture_default_str()
      ->check(CLI::Range(1, 4095));
  cmd->add_option("--actor-max-buffered-mb", a->actor_max_buffered_mb,
                  "Read buffers all actor-port connections may hold together, MiB; a frame beyond it closes its connection")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
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
  cmd->add_option("--shutdown-timeout", a->shutdown_timeout,
                  "Seconds SIGTERM/SIGINT waits for requests being served; past it running generations are cancelled "
                  "(503), queued ones answered, and the server exits 0")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 86400.0));
  cmd->add_option("--max-queued-requests", a->max_queued_requests,
                  "Generation requests (images, rollouts) waiting beyond those running; more get 429 with Retry-After")
      ->capture_default_str()
      ->check(CLI::Range(0, 3900));  // each waits on a handler thread; 4096 at most, room kept for the other endpoints
  cmd->add_option("--http-read-timeout", a->http_read_timeout,
                  "Seconds a request's headers and body may take to arrive (else 408 and the connection closes); also "
                  "the idle time after which a keep-alive connection closes")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 3600.0));
  cmd->add_option("--max-connections", a->max_connections, "Open HTTP connections at most; beyond it new ones are closed at once")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  add_offload_options(*cmd, a->dit_layerwise_offload, a->dit_offload_prefetch_size);
  commands.emplace_back(cmd, [a] { return serve(*a); });
}

}  // namespace refit::apps
