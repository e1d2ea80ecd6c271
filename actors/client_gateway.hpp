// The client gateway: the one actor the actor port publishes. It forwards the client API
// (messages/client_api.hpp) and worker offers (cluster.hpp; the scheduler checks their secret) to the
// scheduler and has no handler for anything else, so a remote peer can neither pause generation nor
// inject faults. It stops when the scheduler does.
#pragma once

#include "messages/protocol.hpp"

namespace refit::actors {

msg::cluster_api_actor spawn_client_gateway(caf::actor_system& sys, msg::cluster_api_actor scheduler);

}  // namespace refit::actors
