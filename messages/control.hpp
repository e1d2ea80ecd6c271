// The internal protocol of a server process: the scheduler's own interface (generation gating, shutdown, fault
// injection), the update transaction and the HTTP bridge. The interfaces of each worker's actors are in
// worker_api.hpp; none of this is published on the actor port (see client_api.hpp and cluster.hpp).
#pragma once

#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "messages/atoms.hpp"
#include "messages/client_api.hpp"
#include "messages/cluster.hpp"
#include "messages/worker_api.hpp"
#include "messages/types.hpp"

namespace refit::msg {

// The server's scheduler: the client API and joining workers, plus what update transactions and tests use.
using scheduler_actor = cluster_api_actor::extend<
    // Used by update transactions: stop dispatching and drain (or cancel) in-flight work; then resume.
    caf::replies_to<pause_atom, bool /*abort in flight*/>::with<uint64_t /*cancelled*/>,
    // committed: the update's weights are live, so the served identity changes before anything generates.
    caf::replies_to<resume_atom, bool /*committed*/>::with<std::string /*weight_version now served*/>,
    // The server is stopping: queued generations and updates are answered ("shutting down"), running generations
    // cancelled, and every later request refused; replies once nothing generates (the requests cancelled).
    caf::replies_to<shutdown_atom>::with<uint64_t /*cancelled*/>,
    // Test builds: a fault for module M of worker W.
    caf::replies_to<fault_atom, std::string /*module*/, int32_t /*worker*/, fault_spec>::with<bool>>;

// One update transaction: replies to the single (update_atom, update_request) it is sent with an
// update_result, then exits. The scheduler spawns one per update, at most one at a time.
using transaction_actor = caf::typed_actor<caf::replies_to<update_atom, update_request>::with<update_result>>;

// The HTTP bridge; info: the URL it serves, http://HOST:PORT. shutdown: stop accepting connections and
// requests, then wait at most `wait_ms` for the requests being served; replies how many still run.
using http_bridge_actor = caf::typed_actor<caf::replies_to<info_atom>::with<std::string>,
                                           caf::replies_to<shutdown_atom, int64_t /*wait_ms*/>::with<uint64_t /*still running*/>>;

}  // namespace refit::msg
