// The transfer actor: one per worker. Joins and leaves the torch.distributed groups trainers create
// (the worker is rank rank_offset + its index), and receives what a trainer broadcasts for an update
// into the worker's received table, which the worker's module actors then update from. Detached: joining
// and receiving block, and generation must not wait for them.
#pragma once

#include <chrono>
#include <memory>

#include "messages/protocol.hpp"

namespace refit::pipeline {
class diffusion_pipeline;
}
namespace refit::transfer {
class received_table;
}

namespace refit::actors {

struct transfer_setup {
  int32_t index = 0;
  std::shared_ptr<pipeline::diffusion_pipeline> pipeline;  // the worker's: its modules' names, shapes and dtypes
  std::shared_ptr<transfer::received_table> received;      // shared with the worker's module actors
  std::chrono::milliseconds timeout{600000};               // joining a group; each broadcast
};

msg::transfer_actor spawn_transfer_actor(caf::actor_system& sys, transfer_setup setup);

}  // namespace refit::actors
