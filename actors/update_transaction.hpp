// One weight update as a supervised transaction (DESIGN.md section 3; the phase diagram is at the top
// of update_transaction.cpp and in docs/architecture.md).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "messages/protocol.hpp"

namespace refit::actors {

// Everything a transaction talks to. The scheduler spawns one per update, at most one at a time.
struct transaction_context {
  msg::scheduler_actor scheduler;                     // pause / resume of generation
  std::vector<msg::module_supervisor_actor> workers;  // per worker: module handles, recovery of dead module actors
  std::vector<msg::cache_actor> caches;               // reset when flush_cache
  std::vector<std::string> pipeline_modules;          // the pipeline's weight-bearing modules
  std::string denoiser;                               // default target of an update from a trainer
  std::vector<msg::transfer_actor> transfers;         // per worker: receives distributed updates
  uint64_t update = 0;                                // this transaction's number (names what workers receive)
  std::vector<std::string> allowed_roots;             // files an update reads lie beneath these (empty: anywhere)
  std::vector<size_t> members{};                      // the workers taking part (indices into the vectors above)
  // A catch-up: these sources (module -> source) instead of planning the request, and generation goes on
  // (the one member is not serving yet).
  std::map<std::string, msg::weight_source> preplanned{};
  // Read once per host: per worker, the worker of the same process whose staged copy of a checkpoint it copies
  // instead of reading the files (-1, or no entry: it reads them).
  std::vector<int32_t> copy_from{};
};

msg::transaction_actor spawn_update_transaction(caf::actor_system& sys, transaction_context context);

}  // namespace refit::actors
