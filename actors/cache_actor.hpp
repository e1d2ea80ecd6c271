// The cache actor: one per worker, holding the worker's sampling cache state (TeaCache). A weight
// update with flush_cache resets it, so no state computed with old weights is used with new ones.
#pragma once

#include "messages/protocol.hpp"

namespace refit::actors {

msg::cache_actor spawn_cache_actor(caf::actor_system& sys, int32_t worker);

}  // namespace refit::actors
