// The http_bridge actor (DESIGN.md sections 1 and 5): refit's asynchronous HTTP server (net/http_server.hpp)
// on its own threads. Each HTTP request, once read whole, becomes one typed request to the scheduler from a
// scoped_actor of a handler thread (blocking, with a timeout), and the reply becomes JSON. shutdown_atom
// stops accepting and waits a bounded time for what is being served; the actor's exit closes everything;
// the actor exits when the scheduler does. It speaks only the client API (messages/client_api.hpp).
#pragma once

#include <caf/all.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "messages/protocol.hpp"
#include "net/model_root_policy.hpp"

namespace refit::net {

struct http_bridge_config {
  std::string host = "127.0.0.1";
  uint16_t port = 30010;          // 0: an ephemeral port
  std::string api_key;            // empty: the admin endpoints are open
  std::vector<std::filesystem::path> allowed_model_roots;
  size_t max_request_bytes = 1 << 20;
  // response_format "url": how long generated images stay fetchable, and how many bytes of them are kept.
  std::chrono::seconds image_url_ttl{600};
  uint64_t image_store_bytes = 256ull << 20;
  // Updates of a large cold checkpoint and long generations legitimately take minutes.
  std::chrono::seconds request_timeout{3600};
  // A request's headers and body must arrive within this (else 408); idle keep-alive connections close after it.
  std::chrono::milliseconds read_timeout{30000};
  size_t max_connections = 4096;
  // Generation requests (images, rollouts) beyond workers + this many are answered 429 with Retry-After.
  size_t max_queued_requests = 256;
  size_t workers = 1;
};

struct http_bridge {
  msg::http_bridge_actor actor;
  uint16_t port = 0;
};

// Binds host:port and returns once the server accepts connections. Throws std::runtime_error when
// the address cannot be bound, std::invalid_argument for a bad allowed root.
http_bridge spawn_http_bridge(caf::actor_system& sys, msg::client_api_actor scheduler, http_bridge_config config);

}  // namespace refit::net
