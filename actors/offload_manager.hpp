// The offload manager: one per worker and layerwise-offloaded module. It answers for that module's
// models::layer_offload (blocks, resident blocks, host and device bytes, copies) in /model_info and
// /metrics. The data path does not go through it: the worker's compute thread fetches blocks with
// direct calls and the module actor writes the host store (see msg::offload_manager_actor).
#pragma once

#include <memory>
#include <string>

#include "messages/protocol.hpp"

namespace refit::pipeline {
class diffusion_pipeline;
}

namespace refit::actors {

// `pipe` must have layerwise offload on for `module`.
msg::offload_manager_actor spawn_offload_manager(caf::actor_system& sys, int32_t worker,
                                                 std::shared_ptr<pipeline::diffusion_pipeline> pipe, std::string module);

}  // namespace refit::actors
