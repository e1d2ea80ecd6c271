// `refit worker --join HOST:PORT`: a process whose workers join a running `refit serve` (its actor port) and
// take part in its generation and in every update transaction, reading checkpoints from this host's disk.
#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <pthread.h>
#include <unistd.h>

#include <condition_variable>
#include <csignal>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <sys/stat.h>
#include <thread>

#include "actors/engine.hpp"
#include "actors/node_agent.hpp"
#include "apps/commands.hpp"
#include "net/remote.hpp"
#include "pipeline/models/placement.hpp"
#include "pipeline/weights/hf_cache.hpp"

namespace refit::apps {

namespace {

struct worker_args {
  std::string join, model_path, devices = "cpu", dtype, name, secret_file;
  std::vector<std::string> map_paths;
  std::string tls_cert, tls_key, tls_ca;
  uint64_t max_message_mb = 16, max_buffered_mb = 256;
  double retry_interval = 2;
  models::compute_tuning tuning;
};

}  // namespace

std::string read_worker_secret(const std::string& path) {
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) throw std::invalid_argument("--worker-secret-file " + path + ": " + std::strerror(errno));
  if (st.st_mode & (S_IRWXG | S_IRWXO))
    throw std::invalid_argument("--worker-secret-file " + path + " is readable by group or others (chmod 600 it)");
  std::ifstream in(path);
  std::string secret;
  std::getline(in, secret);
  if (!secret.empty() && secret.back() == '\r') secret.pop_back();
  if (secret.size() < 16) throw std::invalid_argument("--worker-secret-file " + path + ": the secret must be at least 16 characters");
  return secret;
}

namespace {

std::pair<std::string, uint16_t> parse_join(const std::string& s) {
  const auto colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0) throw std::invalid_argument("--join must be HOST:PORT, got '" + s + "'");
  const std::string port = s.substr(colon + 1);
  char* end = nullptr;
  const long p = std::strtol(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || p < 1 || p > 65535) throw std::invalid_argument("--join: port must be 1..65535, got '" + port + "'");
  std::string host = s.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  return {host, static_cast<uint16_t>(p)};
}

actors::path_map parse_maps(const std::vector<std::string>& maps) {
  actors::path_map out;
  for (const auto& m : maps) {
    const auto eq = m.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == m.size() || m[0] != '/' || m[eq + 1] != '/')
      throw std::invalid_argument("--map-path must be SERVER_FOLDER=LOCAL_FOLDER (both absolute), got '" + m + "'");
    out.prefixes.emplace_back(m.substr(0, eq), m.substr(eq + 1));
  }
  return out;
}

int run_worker(const worker_args& a) {
  sigset_t stop_signals = wait_for_stop_signals_only();

  const auto [host, port] = parse_join(a.join);
  const std::string secret = read_worker_secret(a.secret_file);
  const actors::path_map paths = parse_maps(a.map_paths);
  const net::actor_port_tls tls{a.tls_cert, a.tls_key, a.tls_ca};
  if (!tls.enabled() && !net::is_loopback_host(host))
    throw std::invalid_argument("--join " + host + " is not a loopback address: give --actor-tls-cert, --actor-tls-key and --actor-tls-ca "
                                "(the server's actor port requires mutual TLS off loopback)");
  if (tls.enabled()) net::check_actor_port_tls(tls, "--actor-tls-");
  if (a.max_buffered_mb < a.max_message_mb) throw std::invalid_argument("--actor-max-buffered-mb must be at least --actor-max-message-mb");
  std::vector<std::string> devices;
  try {
    devices = models::parse_device_list(a.devices, a.dtype);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("--") + e.what());
  }
  std::string name = a.name;
  if (name.empty()) {
    char h[256] = {};
    gethostname(h, sizeof h - 1);
    name = std::string(h) + ":" + std::to_string(getpid());
  }

  net::remote_system_config cfg{tls};
  caf::actor_system sys{cfg};
  const std::string model_path = weights::resolve_model_path(a.model_path);
  spdlog::info("refit worker '{}': loading {} on {} device(s) ({})", name, model_path, devices.size(), a.devices);
  models::apply_compute_tuning(a.tuning, first_gpu(devices));
  if (a.devices != "cpu") spdlog::info("refit worker: {}", models::describe_compute_tuning());
  actors::engine_config engine{model_path, devices, a.dtype};
  engine.paths = paths;
  for (const auto& [from, to] : paths.prefixes) spdlog::info("refit worker: the server's {} is {} here", from, to);
  actors::worker_set set = actors::spawn_workers(sys, engine);

  net::actor_port_endpoint endpoint(sys, {static_cast<size_t>(a.max_message_mb) << 20, static_cast<size_t>(a.max_buffered_mb) << 20});
  std::mutex m;
  std::condition_variable cv;
  int exit_code = -1;
  auto finish = [&](int code) {
    std::lock_guard lock(m);
    if (exit_code < 0) exit_code = code;
    cv.notify_all();
  };
  actors::node_config node;
  node.name = name;
  node.secret = secret;
  node.retry = std::chrono::milliseconds(static_cast<int64_t>(a.retry_interval * 1000));
  node.connect = [&endpoint, host = host, port = port] { return endpoint.connect_cluster(host, port, std::chrono::seconds(10)); };
  node.refused = [&](const std::string& why) {
    spdlog::error("refit worker: the server refused this process for good: {}", why);
    finish(2);
  };
  spdlog::info("refit worker '{}': joining {}:{}{}", name, host, port, endpoint.tls() ? " over mutual TLS" : "");
  auto agent = actors::spawn_node_agent(sys, std::move(set), node);

  std::thread signal_waiter([&] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    spdlog::info("refit worker: {} received; leaving (the server gives its requests to other workers)", strsignal(sig));
    finish(0);
  });
  signal_waiter.detach();
  std::unique_lock lock(m);
  cv.wait(lock, [&] { return exit_code >= 0; });
  spdlog::default_logger()->flush();
  // Leaving closes the connection: the server treats this worker as lost (an update in flight rolls back).
  std::_Exit(exit_code);
}

}  // namespace

void add_worker_commands(CLI::App& app, command_registry& commands) {
  auto a = std::make_shared<worker_args>();
  auto* cmd = app.add_subcommand("worker", "Join a running `refit serve` as one worker per device (a process on another host)");
  cmd->add_option("--join", a->join, "The server's actor port, HOST:PORT (refit serve --actor-port)")->required();
  cmd->add_option("--model", a->model_path,
                  "Diffusers folder (or Hugging Face id in the local cache) loaded at start; the server then gives every "
                  "worker the weights it serves")
      ->required();
  cmd->add_option("--worker-secret-file", a->secret_file, "File holding the server's worker secret (refit serve --worker-secret-file)")
      ->required();
  cmd->add_option("--devices", a->devices, "One worker per device: cpu, cuda:0,cuda:1, or all (every GPU)")->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)");
  add_compute_tuning_options(*cmd, a->tuning);
  cmd->add_option("--name", a->name, "How the server names this process in logs and /get_model_info (default: HOSTNAME:PID)");
  cmd->add_option("--map-path", a->map_paths,
                  "SERVER_FOLDER=LOCAL_FOLDER: a checkpoint folder an update names on the server is read from LOCAL_FOLDER "
                  "here; repeatable, first match wins (default: the same paths)");
  cmd->add_option("--retry-interval", a->retry_interval, "Seconds between attempts to reach or join the server")->capture_default_str();
  cmd->add_option("--actor-tls-cert", a->tls_cert, "This worker's certificate (PEM), signed by the cluster CA; turns on mutual TLS");
  cmd->add_option("--actor-tls-key", a->tls_key, "The private key of --actor-tls-cert (PEM, unencrypted)");
  cmd->add_option("--actor-tls-ca", a->tls_ca, "The cluster CA (PEM) the server's certificate must be signed by");
  cmd->add_option("--actor-max-message-mb", a->max_message_mb, "Largest message accepted from the server")->capture_default_str();
  cmd->add_option("--actor-max-buffered-mb", a->max_buffered_mb, "Most bytes buffered for incoming messages")->capture_default_str();
  commands.emplace_back(cmd, [a] { return run_worker(*a); });
}

}  // namespace refit::apps
