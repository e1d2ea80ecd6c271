// The scheduler: one per server. Admits generation requests and dispatches them to the least-loaded
// worker, owns the served model's identity (model_path, weight_version, per-module source folders),
// gates generation while an update commits, and runs updates one at a time as transactions.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "messages/protocol.hpp"

namespace refit::actors {

struct engine_config {
  std::filesystem::path model_path;
  std::vector<std::string> devices{"cpu"};  // one worker per entry: cpu, cuda, cuda:1, ...
  std::string dtype;                         // bf16, fp16, fp32; empty: bf16 on CUDA, fp32 on CPU
  bool dit_layerwise_offload = false;        // transformer blocks in host memory, prefetched to the device
  double dit_offload_prefetch_size = 1;      // blocks prefetched ahead (>= 1), or a fraction of them
};

// Loads the model on every worker (throws on a bad model), spawns workers, module, cache and
// scheduler actors, and returns the scheduler.
msg::scheduler_actor spawn_engine(caf::actor_system& sys, const engine_config& config);

}  // namespace refit::actors
