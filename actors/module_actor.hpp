// The module actor: validate / stage / commit / rollback / finalize / checksum of one weight-bearing
// module of one worker. Its state (live weights are in the pipeline; shadows, undo record, source
// folder here) outlives the actor, so a respawned actor can undo what a dead one left half done.
#pragma once

#include <memory>
#include <string>

#include "messages/protocol.hpp"

namespace refit::pipeline {
class flux2_klein_pipeline;
}
namespace refit::weights {
class device_loader;
}

namespace refit::actors {

struct module_state;

// `loader`: the worker's GPU fast path (pinned staging ring), shared by its modules; null on CPU.
std::shared_ptr<module_state> make_module_state(std::shared_ptr<pipeline::flux2_klein_pipeline> pipe, std::string module,
                                                int32_t worker, std::string class_name, std::string source_dir,
                                                std::shared_ptr<weights::device_loader> loader = nullptr);

// Detached: reading weights takes seconds and must not hold a scheduler thread. On start it rolls back
// any commit its state records as unfinished (left by a predecessor that died), unless that commit was
// decided (mark_decided); a decided one it finalizes.
msg::module_actor spawn_module_actor(caf::actor_system& sys, std::shared_ptr<module_state> state);

// Records that the module's latest commit is decided: every participant of its update committed. Safe
// from any thread (the supervisor calls it while the module actor waits for its finalize).
void mark_decided(module_state& state);

// Whether this build honours fault injection (test builds).
bool fault_injection_compiled();

}  // namespace refit::actors
