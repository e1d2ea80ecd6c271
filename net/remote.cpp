#include "net/remote.hpp"

#include <caf/io/all.hpp>

#include <stdexcept>
#include <thread>

namespace refit::net {

remote_system_config::remote_system_config() {
  msg::add_types(*this);
  load<caf::io::middleman>();
  // Module actors and workers run detached; the shared pool only carries the scheduler, update
  // transactions and cache actors, which must stay responsive while HTTP threads block on replies.
  set("scheduler.max-threads", static_cast<size_t>(std::max(4u, std::thread::hardware_concurrency())));
}

uint16_t publish_client_api(const msg::client_api_actor& gateway, const std::string& host, uint16_t port) {
  auto bound = caf::io::publish(gateway, port, host.c_str(), /*reuse_addr=*/true);
  if (!bound)
    throw std::runtime_error("cannot publish the client API on " + host + ":" + std::to_string(port) + ": " +
                             caf::to_string(bound.error()));
  return *bound;
}

void unpublish_client_api(const msg::client_api_actor& gateway, uint16_t port) { caf::io::unpublish(gateway, port); }

msg::client_api_actor connect_client_api(caf::actor_system& sys, const std::string& host, uint16_t port) {
  auto remote = caf::io::remote_actor<msg::client_api_actor>(sys, host, port);
  if (!remote)
    throw std::runtime_error("cannot connect to a refit scheduler at " + host + ":" + std::to_string(port) + ": " + sys.render(remote.error()));
  return *remote;
}

}  // namespace refit::net
