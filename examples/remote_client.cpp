// A C++ client of a running `refit serve --actor-port N`: it talks to the server's scheduler with the
// client API (messages/client_api.hpp) over CAF's middleman (BASP over TCP, or over mutual TLS with its
// own client certificate), the same messages the HTTP bridge sends. It reads the checksums, refits the
// server to a checkpoint, reads them again and generates one image, checking that the image was made
// with the new weight_version.
//
//   refit_remote_client HOST ACTOR_PORT --model-path DIR [--seed N] [--out PNG]
//                       [--tls-cert CLIENT.pem --tls-key CLIENT.key --tls-ca CA.pem]
//
// Needs only the protocol and the actor port (CAF, OpenSSL, no libtorch). Exit code 0 when every step
// succeeded, 1 otherwise.
#include <caf/all.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "messages/protocol.hpp"
#include "net/remote.hpp"

namespace {

using namespace refit;

struct options {
  std::string host;
  uint16_t port = 0;
  std::string model_path;
  std::vector<std::string> modules;  // empty: every weight-bearing module
  std::string weight_version;
  std::string mode = "auto";
  uint64_t seed = 7;
  std::string prompt = "a red fox in the snow";
  std::string size;  // WxH; empty: the model's default
  int64_t steps = 0;
  std::string out;
  int timeout_s = 600;
  int connect_timeout_s = 60;
  net::actor_port_tls tls;
  uint64_t max_message_mb = 1024;  // replies carry images (and rollouts their latents)
};

// Blocking requests to the remote scheduler. A failure is a value (the error), never an exception.
class scheduler_client {
 public:
  scheduler_client(caf::actor_system& sys, msg::client_api_actor scheduler, std::chrono::seconds timeout)
      : self_(sys), scheduler_(std::move(scheduler)), timeout_(timeout) {}

  caf::expected<msg::model_info> info() { return ask<msg::model_info>(msg::info_atom::value); }
  caf::expected<std::map<std::string, std::string>> checksums(int32_t worker = 0) {
    return ask<std::map<std::string, std::string>>(msg::checksum_atom::value, msg::checksum_request{{}, worker, msg::checksum_format::sglang});
  }
  caf::expected<msg::update_result> update(msg::update_request req) {
    return ask<msg::update_result>(msg::update_atom::value, std::move(req));
  }
  caf::expected<msg::generation_result> generate(msg::generation_request req) {
    return ask<msg::generation_result>(msg::generate_atom::value, std::move(req));
  }

 private:
  template <class Reply, class... Ts>
  caf::expected<Reply> ask(Ts&&... xs) {
    std::optional<Reply> reply;
    caf::error err;
    self_->request(scheduler_, timeout_, std::forward<Ts>(xs)...)
        .receive([&](Reply& r) { reply = std::move(r); }, [&](caf::error& e) { err = std::move(e); });
    if (reply) return std::move(*reply);
    return err;
  }

  caf::scoped_actor self_;
  msg::client_api_actor scheduler_;
  std::chrono::seconds timeout_;
};

int fail(const std::string& what) {
  std::cerr << "refit_remote_client: error: " << what << "\n";
  return 1;
}

std::string human_bytes(uint64_t bytes) {
  char buf[32];
  if (bytes >= (1ull << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / double(1ull << 30));
  else if (bytes >= (1ull << 20)) std::snprintf(buf, sizeof buf, "%.2f MiB", bytes / double(1ull << 20));
  else if (bytes >= (1ull << 10)) std::snprintf(buf, sizeof buf, "%.1f KiB", bytes / double(1ull << 10));
  else std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  return buf;
}

void print_checksums(const std::string& title, const std::map<std::string, std::string>& sums,
                     const std::map<std::string, std::string>* before = nullptr) {
  std::cout << title << "\n";
  for (const auto& [module, hex] : sums) {
    std::printf("  %-14s %s", module.c_str(), hex.c_str());
    if (before) {
      auto it = before->find(module);
      std::printf("  %s", it == before->end() ? "(new)" : it->second == hex ? "unchanged" : "changed");
    }
    std::printf("\n");
  }
}

void print_update(const msg::update_result& r) {
  std::cout << "update: " << (r.success ? "success" : "FAILED") << "\n";
  std::cout << "  message:        " << r.message << "\n";
  std::cout << "  weight_version: " << r.weight_version << "\n";
  if (r.mode != msg::write_path::none)
    std::cout << "  mode:           " << msg::to_string(r.mode) << (r.mode_reason.empty() ? "" : " (" + r.mode_reason + ")") << "\n";
  std::cout << "  cache flushed:  " << (r.cache_flushed ? "yes" : "no") << ", requests aborted: " << r.aborted_requests
            << "\n";
  if (!r.modules.empty()) {
    std::printf("  %-14s %6s %8s %12s %9s  %-9s %s\n", "module", "worker", "tensors", "bytes", "seconds", "path",
                "source_dir");
    for (const auto& m : r.modules)
      std::printf("  %-14s %6d %8llu %12s %9.3f  %-9s %s\n", m.module.c_str(), m.worker,
                  static_cast<unsigned long long>(m.tensors), human_bytes(m.bytes).c_str(), m.seconds, msg::to_string(m.path).c_str(),
                  m.source.c_str());
  }
  if (!r.timings.empty()) {
    // Phases in the order they run; anything else the server reports follows.
    static const std::vector<std::string> order{"plan", "validate", "stage", "drain", "pause", "commit", "finish", "total"};
    std::cout << "  timings (s):   ";
    for (const auto& phase : order)
      if (auto it = r.timings.find(phase); it != r.timings.end()) std::printf(" %s %.4f", phase.c_str(), it->second);
    for (const auto& [phase, s] : r.timings)
      if (std::find(order.begin(), order.end(), phase) == order.end()) std::printf(" %s %.4f", phase.c_str(), s);
    std::printf("\n");
  }
}

bool parse_size(const std::string& text, int64_t& width, int64_t& height) {
  auto x = text.find('x');
  if (x == std::string::npos) return false;
  try {
    size_t used_w = 0, used_h = 0;
    width = std::stoll(text.substr(0, x), &used_w);
    height = std::stoll(text.substr(x + 1), &used_h);
    return used_w == x && used_h == text.size() - x - 1 && width > 0 && height > 0;
  } catch (const std::exception&) {
    return false;
  }
}

int run(caf::actor_system& sys, net::actor_port_endpoint& endpoint, const options& opt) {
  std::cout << "connecting to " << opt.host << ":" << opt.port << (endpoint.tls() ? " over mutual TLS" : "") << " ...\n";
  // A server that is still loading its model does not listen yet: retry until the deadline.
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::seconds(opt.connect_timeout_s);
  const auto left = [&] {
    return std::max(std::chrono::milliseconds(1000), std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()));
  };
  auto remote = endpoint.connect(opt.host, opt.port, left());
  for (int attempt = 1; !remote && clock::now() < deadline; ++attempt) {
    if (attempt == 1) std::cout << "  not reachable yet (" << sys.render(remote.error()) << "); retrying for up to " << opt.connect_timeout_s << " s\n";
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min(1000, 100 * attempt)));
    remote = endpoint.connect(opt.host, opt.port, left());
  }
  if (!remote)
    return fail("cannot reach the client API at " + opt.host + ":" + std::to_string(opt.port) + " within " +
                std::to_string(opt.connect_timeout_s) + " s: " + sys.render(remote.error()) + " (is `refit serve --actor-port " +
                std::to_string(opt.port) + "` running there" + (endpoint.tls() ? ", with a certificate of the same CA?)" : ", without TLS?)"));
  scheduler_client client(sys, *remote, std::chrono::seconds(opt.timeout_s));

  auto info = client.info();
  if (!info) return fail("model info: " + msg::describe(info.error()));
  std::cout << "serving " << info->model_path << " (weight_version " << info->weight_version << ", "
            << info->modules.size() << " module replicas)\n";

  auto before = client.checksums();
  if (!before) return fail("checksums before the update: " + msg::describe(before.error()));
  print_checksums("checksums before (worker 0):", *before);

  msg::update_request req;
  req.model_path = opt.model_path;
  req.target_modules = opt.modules;
  req.weight_version = opt.weight_version;
  req.mode = *msg::parse_update_mode(opt.mode);  // checked by the option parser
  std::cout << "updating to " << opt.model_path << " ...\n";
  auto started = std::chrono::steady_clock::now();
  auto result = client.update(req);
  double round_trip = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (!result) return fail("update request: " + msg::describe(result.error()));
  print_update(*result);
  std::printf("  round trip:      %.4f s\n", round_trip);
  if (!result->success) return fail("the update failed: " + result->message);

  auto after = client.checksums();
  if (!after) return fail("checksums after the update: " + msg::describe(after.error()));
  print_checksums("checksums after (worker 0):", *after, &*before);

  msg::generation_request gen;
  gen.prompts = {opt.prompt};
  gen.seed = opt.seed;
  gen.steps = opt.steps;
  if (!opt.size.empty() && !parse_size(opt.size, gen.width, gen.height))
    return fail("--size must be WxH with positive integers, got '" + opt.size + "'");
  auto image = client.generate(gen);
  if (!image) return fail("generation: " + msg::describe(image.error()));
  if (image->images.empty()) return fail("generation returned no image");
  const auto& png = image->images.front();
  std::printf("generated: %zu-byte PNG in %.3f s on worker %d, weight_version %s\n", png.size(),
              image->inference_time_s, image->worker, image->weight_version.c_str());
  if (!opt.out.empty()) {
    std::ofstream file(opt.out, std::ios::binary | std::ios::trunc);
    file.write(reinterpret_cast<const char*>(png.data()), static_cast<std::streamsize>(png.size()));
    file.close();
    if (!file) return fail("cannot write " + opt.out);
    std::cout << "wrote " << opt.out << "\n";
  }
  // The server switches the served version before any generation resumes, so a mismatch means
  // either a broken guarantee or another client updating in between.
  if (image->weight_version != result->weight_version)
    return fail("the image was generated with weight_version '" + image->weight_version + "', expected '" +
                result->weight_version + "' (did another client update the server in between?)");
  std::cout << "ok\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options opt;
  CLI::App app{"Refits a running `refit serve --actor-port N` over CAF and generates one image with the new weights."};
  app.add_option("host", opt.host, "server host")->required();
  app.add_option("actor_port", opt.port, "the server's --actor-port (logged as `refit serve: actor port N`)")->required();
  app.add_option("--model-path", opt.model_path, "checkpoint folder to load (Diffusers layout, as the server sees it)")
      ->required();
  app.add_option("--module", opt.modules, "target module (repeatable; default: every weight-bearing module)");
  app.add_option("--weight-version", opt.weight_version, "version label of the new weights (default: the server's)");
  app.add_option("--mode", opt.mode, "update path")->capture_default_str()->check(CLI::IsMember({"auto", "staged", "in_place"}));
  app.add_option("--seed", opt.seed, "generation seed")->capture_default_str();
  app.add_option("--prompt", opt.prompt, "generation prompt")->capture_default_str();
  app.add_option("--size", opt.size, "image size WxH (default: the model's; tiny models: e.g. 64x64)");
  app.add_option("--steps", opt.steps, "inference steps (default: the model's)");
  app.add_option("--out", opt.out, "write the generated PNG here");
  app.add_option("--timeout", opt.timeout_s, "seconds to wait for each reply")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--connect-timeout", opt.connect_timeout_s, "seconds to keep retrying while the server does not accept connections yet")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--tls-cert", opt.tls.certificate, "this client's certificate (PEM), signed by the server's --actor-tls-ca; turns on mutual TLS");
  app.add_option("--tls-key", opt.tls.key, "the private key of --tls-cert (PEM, unencrypted)");
  app.add_option("--tls-ca", opt.tls.ca, "the cluster CA (PEM) the server's certificate must be signed by");
  app.add_option("--max-message-mb", opt.max_message_mb, "largest reply accepted, MiB")->capture_default_str()->check(CLI::Range(1, 4095));
  CLI11_PARSE(app, argc, argv);

  try {
    if (opt.tls.enabled()) net::check_actor_port_tls(opt.tls, "--tls-");
  } catch (const std::exception& e) {
    return fail(e.what());
  }
  net::remote_system_config cfg{opt.tls};
  cfg.set("scheduler.max-threads", 2);
  caf::actor_system sys{cfg};
  const size_t max_message = static_cast<size_t>(opt.max_message_mb) << 20;
  net::actor_port_endpoint endpoint{sys, {max_message, max_message}};
  return run(sys, endpoint, opt);
}
