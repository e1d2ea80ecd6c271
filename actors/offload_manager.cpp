#include "actors/offload_manager.hpp"

#include "pipeline/flux2_klein.hpp"
#include "pipeline/models/layer_offload.hpp"

namespace refit::actors {

msg::offload_manager_actor spawn_offload_manager(caf::actor_system& sys, int32_t worker,
                                                 std::shared_ptr<pipeline::flux2_klein_pipeline> pipe) {
  if (!pipe || !pipe->transformer_offload()) throw std::invalid_argument("offload manager: the pipeline has no layerwise offload");
  return sys.spawn([worker, pipe](msg::offload_manager_actor::pointer) -> msg::offload_manager_actor::behavior_type {
    return {
        [worker, pipe](msg::info_atom) -> msg::offload_info {
          const models::layer_offload_info i = pipe->transformer_offload()->info();
          msg::offload_info out;
          out.worker = worker;
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
