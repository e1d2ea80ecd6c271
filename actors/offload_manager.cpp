#include "actors/offload_manager.hpp"

#include "pipeline/models/layer_offload.hpp"
#include "pipeline/pipeline.hpp"

namespace refit::actors {

msg::offload_manager_actor spawn_offload_manager(caf::actor_system& sys, int32_t worker,
                                                 std::shared_ptr<pipeline::diffusion_pipeline> pipe, std::string module) {
  if (!pipe || !pipe->offload(module)) throw std::invalid_argument("offload manager: module '" + module + "' has no layerwise offload");
  return sys.spawn([worker, pipe, module](msg::offload_manager_actor::pointer) -> msg::offload_manager_actor::behavior_type {
    return {
        [worker, pipe, module](msg::info_atom) {
          const models::layer_offload_info i = pipe->offload(module)->info();
          msg::offload_info out;
          out.worker = worker;
          out.module = module;
          out.blocks = i.layers;
          out.prefetch_size = i.prefetch_size;
          out.resident_blocks = i.resident;
          out.host_bytes = i.host_bytes;
          out.spare_host_bytes = i.spare_host_bytes;
          out.device_bytes = i.device_bytes;
          out.prefetches = i.prefetches;
          out.prefetched_bytes = i.prefetched_bytes;
          out.refreshes = i.refreshes;
          return out;
        },
    };
  });
}

}  // namespace refit::actors
