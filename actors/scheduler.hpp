// The scheduler: one per server. Admits generation requests and dispatches them to the least-loaded
// worker, owns the served model's identity (model_path, weight_version), gates generation while an
// update commits, and runs updates one at a time as transactions (update_transaction.hpp).
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "messages/protocol.hpp"

namespace refit::lora {
class adapter_store;
}

namespace refit::actors {

// What the engine hands the scheduler: per worker (same index everywhere) its actors and cancel flag.
struct scheduler_setup {
  std::vector<msg::worker_actor> workers;
  std::vector<msg::module_supervisor_actor> supervisors;
  std::vector<msg::cache_actor> caches;
  std::vector<msg::transfer_actor> transfers;
  std::vector<std::shared_ptr<std::atomic<bool>>> cancels;
  std::vector<msg::offload_manager_actor> offloads;  // any number per worker
  std::vector<std::string> modules;                  // the pipeline's weight-bearing modules
  std::string denoiser;                              // the one a trainer's update targets by default (and LoRA)
  std::shared_ptr<lora::adapter_store> adapters;     // the LoRA adapters the module actors loaded
  std::string model_path;
  std::vector<std::string> devices;  // per worker, e.g. "cuda:0" (device memory is reported for these)
  std::vector<std::string> allowed_roots;  // canonical; updates read files only beneath these (empty: anywhere)
  bool check_finite = true;                // an update's check_finite when the request leaves it to the server
  std::string class_name;                  // the pipeline's; a joining worker must serve the same
  std::map<std::string, msg::weight_source> served;  // what each module holds (the load's folders at start)
  std::string worker_secret;               // joining as a worker needs it; empty: nobody may join
  bool read_once = true;                   // a disk update's other local workers copy the first one's staged weights
};

// Links itself to every actor it is given: stopping the scheduler stops them all.
msg::scheduler_actor spawn_scheduler(caf::actor_system& sys, scheduler_setup setup);

}  // namespace refit::actors
