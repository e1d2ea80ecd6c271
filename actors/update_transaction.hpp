// One weight update as a supervised transaction (DESIGN.md section 3): plan, validate, stage, commit
// (with compensating rollbacks to every participant that committed when any fails or dies), finish.
#pragma once

#include <vector>

#include "messages/protocol.hpp"

namespace refit::actors {

// Everything a transaction talks to. The scheduler spawns one per update, at most one at a time.
struct transaction_context {
  msg::scheduler_actor scheduler;             // pause / resume of generation
  std::vector<msg::module_supervisor_actor> workers;  // per worker: module handles, recovery of dead module actors
  std::vector<msg::cache_actor> caches;       // reset when flush_cache
  std::vector<std::string> pipeline_modules;  // the modules the pipeline has (text_encoder, transformer, vae)
};

// Replies to the single (update_atom, update_request) it is sent with an update_result; then exits.
using transaction_actor = caf::typed_actor<caf::replies_to<msg::update_atom, msg::update_request>::with<msg::update_result>>;

transaction_actor spawn_update_transaction(caf::actor_system& sys, transaction_context context);

}  // namespace refit::actors
