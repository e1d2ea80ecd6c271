// The engine: loads the pipeline on every device and wires the actors of a server (per worker: cache,
// module actors under their supervisor, offload managers, the transfer actor, the worker; then the
// scheduler). Everything
// model-specific comes from the pipeline interface (pipeline/pipeline.hpp).
#pragma once

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "messages/protocol.hpp"

namespace refit::actors {

struct engine_config {
  std::filesystem::path model_path;
  std::vector<std::string> devices{"cpu"};  // one worker per entry: cpu, cuda, cuda:1, ...
  std::string dtype;                         // bf16, fp16, fp32; empty: bf16 on CUDA, fp32 on CPU
  bool dit_layerwise_offload = false;        // the DiT's blocks in host memory, prefetched to the device
  double dit_offload_prefetch_size = 1;      // blocks prefetched ahead (>= 1), or a fraction of them
  std::chrono::milliseconds weight_sync_timeout{600000};  // joining a trainer's group; each broadcast from it
  // The folders clients' updates may read from (refit serve --allowed-model-root): every file of a checkpoint
  // or LoRA adapter an update names is opened beneath one of them, whichever port the request came
  // through. Empty: any path. The model served at start is the operator's choice and not restricted.
  std::vector<std::filesystem::path> allowed_model_roots{};
  bool check_finite = true;  // updates refuse NaN/Inf values unless the request says otherwise (--check-finite)
};

// Loads the model on every worker (throws on a bad model or device), spawns every actor, and returns
// the scheduler. Stopping the scheduler stops the rest.
msg::scheduler_actor spawn_engine(caf::actor_system& sys, const engine_config& config);

}  // namespace refit::actors
