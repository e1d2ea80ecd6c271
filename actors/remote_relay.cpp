#include "actors/remote_relay.hpp"

namespace refit::actors {

msg::module_actor relay_link::wrap(msg::module_actor remote) {
  if (!remote) return remote;
  std::lock_guard<std::mutex> lock(mutex_);
  auto& relay = modules_[remote.address()];
  if (!relay) relay = spawn_relay(shared_from_this(), remote);
  return relay;
}

std::map<std::string, msg::module_actor> relay_link::wrap(std::map<std::string, msg::module_actor> remote) {
  for (auto& [name, actor] : remote) actor = wrap(actor);
  return remote;
}

void relay_link::close() {
  std::map<caf::actor_addr, msg::module_actor> relays;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    relays.swap(modules_);
  }
  for (auto& [remote, relay] : relays) caf::anon_send_exit(relay, caf::exit_reason::user_shutdown);
}

namespace relay_detail {

caf::error lost(relay_link& link, const caf::error& reason) {
  if (reason == caf::exit_reason::remote_link_unreachable)
    return msg::make_error(msg::refit_errc::worker_lost, "the connection to " + link.label() + " was lost");
  if (reason.category() == msg::error_category) return reason;  // the remote actor's own exit reason
  return msg::make_error(msg::refit_errc::worker_lost, link.label() + ": an actor exited (" + link.system().render(reason) + ")");
}

}  // namespace relay_detail

}  // namespace refit::actors
