// The http_bridge actor (DESIGN.md sections 1 and 5): an embedded cpp-httplib server on its own
// threads. Each HTTP request becomes one typed request to the scheduler from a scoped_actor of the
// handling thread (blocking, with a timeout), and the reply becomes JSON. The server stops, after
// its in-flight requests finish, when the actor exits; the actor exits when the scheduler does.
#pragma once

#include <caf/all.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "messages/protocol.hpp"

namespace refit::net {

// Where update checkpoints may be read from (--allowed-model-root). Paths are compared after
// resolving symlinks and "..": a path that does not exist yet resolves through its deepest
// existing parent and is then checked lexically.
class model_root_policy {
 public:
  model_root_policy() = default;
  // Each root must be an existing directory (a typo should stop the server, not lock it open or shut).
  explicit model_root_policy(const std::vector<std::filesystem::path>& roots);

  bool restricted() const { return !roots_.empty(); }
  const std::vector<std::filesystem::path>& roots() const { return roots_; }
  // The resolved path, which lies inside a root, or nullopt (every path is admitted when unrestricted).
  std::optional<std::filesystem::path> admit(const std::string& model_path) const;

  static std::filesystem::path resolve(const std::filesystem::path& p);

 private:
  std::vector<std::filesystem::path> roots_;  // resolved
};

struct http_bridge_config {
  std::string host = "127.0.0.1";
  uint16_t port = 30010;          // 0: an ephemeral port
  std::string api_key;            // empty: the admin endpoints are open
  std::vector<std::filesystem::path> allowed_model_roots;
  size_t max_request_bytes = 1 << 20;
  // Updates of a large cold checkpoint and long generations legitimately take minutes.
  std::chrono::seconds request_timeout{3600};
};

// info: the URL it serves, http://HOST:PORT.
using http_bridge_actor = caf::typed_actor<caf::replies_to<msg::info_atom>::with<std::string>>;

struct http_bridge {
  http_bridge_actor actor;
  uint16_t port = 0;
};

// Binds host:port and returns once the server accepts connections. Throws std::runtime_error when
// the address cannot be bound, std::invalid_argument for a bad allowed root.
http_bridge spawn_http_bridge(caf::actor_system& sys, msg::scheduler_actor scheduler, http_bridge_config config);

}  // namespace refit::net
