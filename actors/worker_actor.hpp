// The worker: one per device. Holds that device's pipeline, runs generation on its own thread
// (detached), and supervises the device's module actors.
#pragma once

#include <atomic>
#include <filesystem>
#include <memory>

#include "messages/protocol.hpp"

namespace refit::actors {

struct worker_config {
  std::filesystem::path model_path;
  std::string device = "cpu";   // cpu, cuda, cuda:N
  std::string dtype;            // bf16, fp16, fp32; empty: bf16 on CUDA, fp32 on CPU
  int32_t index = 0;
  msg::cache_actor cache;       // receives the worker's TeaCache counters; may be null
  bool dit_layerwise_offload = false;  // keep the transformer's blocks in host memory (layer_offload)
  double dit_offload_prefetch_size = 1;
};

struct worker_handles {
  msg::worker_actor worker;
  msg::module_supervisor_actor modules;
  msg::offload_manager_actor offload;  // null without layerwise offload
};

// Loads the pipeline (strictly, every module) before returning, so a bad model path fails here.
// `cancel` is raised by the scheduler to stop this worker's generation between sampling steps.
worker_handles spawn_worker(caf::actor_system& sys, const worker_config& config, std::shared_ptr<std::atomic<bool>> cancel);

}  // namespace refit::actors
