// The module actor: the message adapter of one module's update core (update::module_updater) on one
// worker. It turns phase messages into calls, failures into error replies that name module and phase,
// and (test builds) honours fault injection. The core outlives the actor, so a replacement actor
// settles what a dead one left half done.
#pragma once

#include <map>
#include <memory>

#include "actors/path_map.hpp"
#include "messages/protocol.hpp"

namespace refit::update {
class module_updater;
}
namespace refit::transfer {
class received_table;
}
namespace refit::lora {
class adapter_store;
}

namespace refit::actors {

// What a module actor works on and what outlives it: the update core, and in test builds a fault
// waiting for its phase.
struct module_state {
  std::shared_ptr<update::module_updater> core;
  std::shared_ptr<const transfer::received_table> received;  // the worker's; distributed updates read it
  std::shared_ptr<lora::adapter_store> adapters;              // the server's LoRA adapters; merges read it
  std::shared_ptr<const path_map> paths;                      // a joined worker: where this host has the server's folders
  // The same module on the other workers of this process (read once per host: weight_source::copy_from).
  std::shared_ptr<const std::map<int32_t, std::shared_ptr<update::module_updater>>> siblings;
  msg::fault_spec fault;  // fires once in its phase
};

std::shared_ptr<module_state> make_module_state(std::shared_ptr<update::module_updater> core,
                                                std::shared_ptr<const transfer::received_table> received = nullptr,
                                                std::shared_ptr<lora::adapter_store> adapters = nullptr);

// Detached: reading weights takes seconds and must not hold a scheduler thread. On start it settles any
// update its state records as unfinished (update::module_updater::on_actor_start).
msg::module_actor spawn_module_actor(caf::actor_system& sys, std::shared_ptr<module_state> state);

// Whether this build honours fault injection (test builds).
bool fault_injection_compiled();

}  // namespace refit::actors
