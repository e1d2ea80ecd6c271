// The scheduler's state and the helpers its two files share (scheduler.cpp: generation, updates, groups;
// scheduler_queries.cpp: checksums, model info, LoRA status, device memory, stats, fault injection). Private to
// actors/.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <variant>
#include <vector>

#include "actors/fan_out.hpp"
#include "actors/lora_ops.hpp"
#include "actors/scheduler.hpp"

namespace refit::actors::sched {

using msg::refit_errc;
using clock = std::chrono::steady_clock;

constexpr auto generation_timeout = std::chrono::seconds(3600);
constexpr auto query_timeout = std::chrono::seconds(600);

using module_map = std::map<std::string, msg::module_actor>;

// A queued request for a worker: an image generation or a rollout.
template <class Request, class Result> struct job {
  Request req;
  caf::typed_response_promise<Result> promise;
  clock::time_point enqueued;
};
using generation_job = job<msg::generation_request, msg::generation_result>;
using rollout_job = job<msg::rollout_request, msg::rollout_result>;
using pending_generation = std::variant<generation_job, rollout_job>;

struct pending_update {
  msg::update_request req;
  caf::typed_response_promise<msg::update_result> promise;
};

struct sched_state {
  scheduler_setup setup;
  std::vector<int> in_flight; // per worker
  std::deque<pending_generation> queue;
  bool paused = false;
  std::vector<caf::typed_response_promise<uint64_t>> pause_waiters;
  uint64_t cancelling = 0;
  std::deque<pending_update> updates;
  bool updating = false;
  msg::update_request current_update;
  std::string model_path;
  std::string weight_version = "0";
  uint64_t update_count = 0;
  uint64_t transactions = 0; // every update started, whatever its outcome:
                             // names what workers receive
  lora_registry lora;
  bool sleeping = false;  // release_memory_occupation: generation and updates wait for resume
  bool memory_busy = false;  // a release or resume is running
  bool shutting_down = false;  // shutdown_atom: everything queued was answered, nothing new is taken
  msg::scheduler_stats stats;
  static inline const char *name = "refit.scheduler";
};

using self_ptr = msg::scheduler_actor::stateful_pointer<sched_state>;

uint64_t total_in_flight(const sched_state &st);
void dispatch(self_ptr self);
void start_next_update(self_ptr self);
// The module actors of workers `which` (module name -> actor, per worker).
void module_actors(self_ptr self, std::vector<size_t> which,
                   std::function<void(fan_in<module_map> &)> done);

// scheduler_queries.cpp
caf::result<std::map<std::string, std::string>>
checksums(self_ptr self, const msg::checksum_request &req);
caf::result<msg::model_info> model_info(self_ptr self);
caf::result<msg::memory_result> release_memory(self_ptr self);
caf::result<msg::memory_result> resume_memory(self_ptr self);
caf::result<std::map<std::string, std::string>>
tensor_hashes(self_ptr self, const std::string &module,
              const std::vector<std::string> &names);
caf::result<msg::lora_status> list_loras(self_ptr self);
caf::result<msg::scheduler_stats> stats(self_ptr self);
caf::result<bool> inject_fault(self_ptr self, const std::string &module,
                               int32_t worker, const msg::fault_spec &f);

} // namespace refit::actors::sched
