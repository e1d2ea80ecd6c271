// The client API over CAF's middleman (BASP over TCP, or over mutual TLS): the server publishes its client
// gateway (actors/client_gateway.hpp, which forwards only messages/client_api.hpp) on an actor port, and a
// C++ client talks to it with the same typed messages as in-process code. Both ends go through an
// actor_port_endpoint, whose connections bound every BASP message (net/actor_port_transport.hpp).
#pragma once

#include <caf/all.hpp>
#include <caf/io/middleman_actor.hpp>

#include <chrono>
#include <cstdint>
#include <string>

#include "messages/protocol.hpp"
#include "net/actor_port_tls.hpp"
#include "net/actor_port_transport.hpp"

namespace refit::net {

// Every process that serves or connects: protocol types registered (the names must match on both
// ends, or the typed handshake fails) and the middleman loaded; with TLS credentials (checked first with
// check_actor_port_tls) also CAF's OpenSSL module, which then requires and verifies the peer's
// certificate on every actor-port connection.
struct remote_system_config : caf::actor_system_config {
  explicit remote_system_config(const actor_port_tls& tls = {});
};

// Whether every address `host` resolves to is a loopback address (127.0.0.0/8, ::1).
bool is_loopback_host(const std::string& host);

// This process's end of actor-port connections: a middleman actor whose connections enforce `limits`
// (TLS when the actor system has credentials). Destroy it before the actor system.
class actor_port_endpoint {
 public:
  actor_port_endpoint(caf::actor_system& sys, const actor_port_limits& limits);
  ~actor_port_endpoint();
  actor_port_endpoint(const actor_port_endpoint&) = delete;
  actor_port_endpoint& operator=(const actor_port_endpoint&) = delete;

  bool tls() const;

  // Publishes on host:port (0: ephemeral) and returns the bound port; throws std::runtime_error.
  uint16_t publish(const msg::cluster_api_actor& gateway, const std::string& host, uint16_t port);

  // Closes the actor port, so remote clients see the server go before the engine stops.
  void unpublish(const msg::cluster_api_actor& gateway, uint16_t port);

  // Connects to a published client API; the error says why not (refused, TLS failed, another interface).
  caf::expected<msg::client_api_actor> connect(const std::string& host, uint16_t port, std::chrono::milliseconds timeout);
  // The same for a process joining as a worker (the server must publish the cluster interface).
  caf::expected<msg::cluster_api_actor> connect_cluster(const std::string& host, uint16_t port, std::chrono::milliseconds timeout);

 private:
  caf::actor_system& sys_;
  caf::io::middleman_actor middleman_;
};

}  // namespace refit::net
