// Workers on other hosts: what a `refit worker --join` process offers a running server, and the interface
// of the node agent that speaks for that process. A joined worker is driven with the same internal
// messages as a local one (worker_api.hpp); the scheduler reaches it through local relays
// (actors/remote_relay.hpp), so a lost connection fails what was asked of it instead of hanging.
#pragma once

#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "messages/atoms.hpp"
#include "messages/client_api.hpp"
#include "messages/worker_api.hpp"

namespace refit::msg {

// The agent of a joined process: cancels its generations when the server pauses with abort_all_requests, and
// hears when the server lets one of its workers go (it then settles that worker and joins again later).
using node_agent_actor = caf::typed_actor<caf::replies_to<cancel_atom, int32_t /*the process's worker*/, bool /*on*/>::with<bool>,
                                          caf::reacts_to<abandon_atom, int32_t /*the process's worker*/, std::string /*why*/>>;

// One worker a joining process offers: its actors and what it serves. The server checks the secret, that the
// pipeline matches its own, brings the worker's weights to what it serves, and only then gives it requests.
struct worker_offer {
  std::string secret;      // refit serve --worker-secret-file's contents; compared in constant time
  std::string host;        // how the process names itself in logs and /get_model_info (its --name)
  int32_t local_index = 0; // the worker's index inside its process
  std::string device;
  std::string class_name;
  std::vector<std::string> modules;
  worker_actor worker;
  module_supervisor_actor supervisor;
  cache_actor cache;
  transfer_actor transfer;
  node_agent_actor agent;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, worker_offer& x) {
  return f(caf::meta::type_name("worker_offer"), x.secret, x.host, x.local_index, x.device, x.class_name, x.modules, x.worker,
           x.supervisor, x.cache, x.transfer, x.agent);
}

// The server's answer: the worker's index there (accepted), or why not.
struct join_reply {
  bool accepted = false;
  int32_t index = -1;
  std::string message;
  bool permanent = false;  // refused for good (wrong secret, another pipeline): trying again cannot help
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, join_reply& x) {
  return f(caf::meta::type_name("join_reply"), x.accepted, x.index, x.message, x.permanent);
}

// What the actor port publishes: the client API, plus joining as a worker (refused unless the server was
// given a worker secret).
using cluster_api_actor = client_api_actor::extend<caf::replies_to<join_worker_atom, worker_offer>::with<join_reply>>;

}  // namespace refit::msg
