// The engine: loads the pipeline on every device and wires the actors of a server (per worker: cache,
// module actors under their supervisor, offload managers, the transfer actor, the worker; then the
// scheduler). Everything
// model-specific comes from the pipeline interface (pipeline/pipeline.hpp).
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <filesystem>
#include <string>
#include <vector>

#include "actors/path_map.hpp"
#include "messages/protocol.hpp"

namespace refit::lora {
class adapter_store;
}

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
  // refit serve --worker-secret-file: processes that present it may join as workers (empty: joining is refused).
  std::string worker_secret{};
  bool read_once = true;  // a disk update reads the files once per process; the other workers copy (--read-once)
  path_map paths{};  // a joined worker (refit worker --map-path): the server's folders as this host has them
};

// One worker's actors and cancel flag, as the scheduler (or a joining process's agent) drives them.
struct worker_actors {
  msg::worker_actor worker;
  msg::module_supervisor_actor supervisor;
  msg::cache_actor cache;
  msg::transfer_actor transfer;
  std::shared_ptr<std::atomic<bool>> cancel;
  std::vector<msg::offload_manager_actor> offloads;
  std::string device;
};

// Every device's worker, loaded and running, and what their pipeline is.
struct worker_set {
  std::vector<worker_actors> workers;
  std::string class_name;
  std::vector<std::string> modules;
  std::string denoiser;
  std::shared_ptr<lora::adapter_store> adapters;
  std::map<std::string, msg::weight_source> loaded;  // each module's folder (the first worker's)
};

// Loads the model on every device of `config` (throws on a bad model or device; nothing runs then) and
// spawns each worker's actors. `first_index` numbers them (a joining process's are renumbered by the server).
worker_set spawn_workers(caf::actor_system& sys, const engine_config& config);

// Loads the model on every worker (throws on a bad model or device), spawns every actor, and returns
// the scheduler. Stopping the scheduler stops the rest.
msg::scheduler_actor spawn_engine(caf::actor_system& sys, const engine_config& config);

}  // namespace refit::actors
