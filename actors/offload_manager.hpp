// The offload manager: one per worker with layerwise offload. It answers for the worker's
// models::layer_offload — blocks, resident blocks, host and device bytes, copies — in /model_info and
// /metrics. The data path does not go through it: the worker's compute thread fetches blocks with
// direct calls and the transformer's module actor writes the host store (see msg::offload_manager_actor).
#pragma once

#include <memory>

#include "messages/protocol.hpp"

namespace refit::pipeline {
class flux2_klein_pipeline;
}

namespace refit::actors {

// `pipe` must have layerwise offload on.
msg::offload_manager_actor spawn_offload_manager(caf::actor_system& sys, int32_t worker,
                                                 std::shared_ptr<pipeline::flux2_klein_pipeline> pipe);

}  // namespace refit::actors
