// The worker: one per device. Runs generation with that device's pipeline on its own thread (detached),
// so the scheduler and the HTTP bridge stay responsive. Its modules' weights are owned by their module
// actors (module_supervisor.hpp); the engine (engine.hpp) wires the two.
#pragma once

#include <atomic>
#include <memory>

#include "messages/protocol.hpp"

namespace refit::pipeline {
class diffusion_pipeline;
}

namespace refit::actors {

struct worker_setup {
  int32_t index = 0;
  std::shared_ptr<pipeline::diffusion_pipeline> pipeline;  // loaded
  msg::cache_actor cache;                                  // receives the worker's TeaCache counters; may be null
  // Raised by the scheduler to stop this worker's generation between sampling steps.
  std::shared_ptr<std::atomic<bool>> cancel;
};

msg::worker_actor spawn_worker(caf::actor_system& sys, worker_setup setup);

}  // namespace refit::actors
