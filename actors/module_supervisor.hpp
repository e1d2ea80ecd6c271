// The module supervisor of one worker: owns the worker's module actors, respawns one that dies on the
// same module state, and answers the transaction's recover and decide requests (see
// msg::module_supervisor_actor). It answers while the worker's own thread is busy generating.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "messages/protocol.hpp"

namespace refit::actors {

struct module_state;

msg::module_supervisor_actor spawn_module_supervisor(caf::actor_system& sys, int32_t worker,
                                                     std::map<std::string, std::shared_ptr<module_state>> modules);

}  // namespace refit::actors
