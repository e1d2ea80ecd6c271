#include "actors/client_gateway.hpp"

namespace refit::actors {

msg::cluster_api_actor spawn_client_gateway(caf::actor_system& sys, msg::cluster_api_actor scheduler) {
  return sys.spawn([scheduler](msg::cluster_api_actor::pointer self) -> msg::cluster_api_actor::behavior_type {
    // Monitored, not linked: the gateway goes with the scheduler, never the other way round.
    self->monitor(scheduler);
    self->set_down_handler([self](caf::down_msg& dm) { self->quit(dm.reason); });
    return {
        [self, scheduler](msg::generate_atom a, msg::generation_request& r) { return self->delegate(scheduler, a, std::move(r)); },
        [self, scheduler](msg::rollout_atom a, msg::rollout_request& r) { return self->delegate(scheduler, a, std::move(r)); },
        [self, scheduler](msg::update_atom a, msg::update_request& r) { return self->delegate(scheduler, a, std::move(r)); },
        [self, scheduler](msg::lora_atom a, msg::lora_request& r) { return self->delegate(scheduler, a, std::move(r)); },
        [self, scheduler](msg::list_loras_atom a) { return self->delegate(scheduler, a); },
        [self, scheduler](msg::join_group_atom a, msg::group_request& r) { return self->delegate(scheduler, a, std::move(r)); },
        [self, scheduler](msg::leave_group_atom a, std::string& name) { return self->delegate(scheduler, a, std::move(name)); },
        [self, scheduler](msg::checksum_atom a, msg::checksum_request& r) { return self->delegate(scheduler, a, std::move(r)); },
        [self, scheduler](msg::tensor_hashes_atom a, std::string& module, std::vector<std::string>& names) {
          return self->delegate(scheduler, a, std::move(module), std::move(names));
        },
        [self, scheduler](msg::info_atom a) { return self->delegate(scheduler, a); },
        [self, scheduler](msg::release_memory_atom a) { return self->delegate(scheduler, a); },
        [self, scheduler](msg::resume_memory_atom a) { return self->delegate(scheduler, a); },
        [self, scheduler](msg::stats_atom a) { return self->delegate(scheduler, a); },
        // Refused by the scheduler unless the offer carries the server's worker secret.
        [self, scheduler](msg::join_worker_atom a, msg::worker_offer& o) { return self->delegate(scheduler, a, std::move(o)); },
    };
  });
}

}  // namespace refit::actors
