// The client API over CAF's middleman (BASP/TCP): the server publishes its client gateway
// (actors/client_gateway.hpp, which forwards only messages/client_api.hpp) on an actor port, and a C++
// client talks to it with the same typed messages as in-process code.
#pragma once

#include <caf/all.hpp>

#include <cstdint>
#include <string>

#include "messages/protocol.hpp"

namespace refit::net {

// Every process that serves or connects: protocol types registered (the names must match on both
// ends, or the typed handshake fails) and the middleman loaded.
struct remote_system_config : caf::actor_system_config {
  remote_system_config();
};

// Publishes on host:port (0: ephemeral) and returns the bound port; throws std::runtime_error.
uint16_t publish_client_api(const msg::client_api_actor& gateway, const std::string& host, uint16_t port);

// Closes the actor port, so remote clients see the server go before the engine stops.
void unpublish_client_api(const msg::client_api_actor& gateway, uint16_t port);

// Connects to a published client API; throws std::runtime_error with CAF's reason.
msg::client_api_actor connect_client_api(caf::actor_system& sys, const std::string& host, uint16_t port);

}  // namespace refit::net
