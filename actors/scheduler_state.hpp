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
  int32_t catch_up = -1;  // >= 0: give this joined worker the served weights (no client waits)
};

// Where a worker stands. Local workers always serve; a joined one serves once it holds the served weights.
enum class worker_status : uint8_t { serving, catching_up, lost };
const char *to_string(worker_status s);

// What the scheduler knows of each worker beyond its actors (same index as setup.workers).
struct worker_slot {
  std::string device;
  std::string host;                  // a joined process's name; empty: local
  worker_status status = worker_status::serving;
  msg::node_agent_actor agent;       // a joined worker's (through a relay): cancels its generations
  int32_t local_index = 0;           // its index in its own process
  caf::actor_addr remote;            // the joined worker's own actor (its down message means it is gone)
};

struct sched_state {
  scheduler_setup setup;
  std::vector<worker_slot> slots; // per worker
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
// scheduler_workers.cpp: workers joining from other processes, losing them, bringing them up to date
std::vector<size_t> serving_workers(const sched_state &st);
caf::result<msg::join_reply> join_worker(self_ptr self, msg::worker_offer &offer);
void worker_down(self_ptr self, const caf::down_msg &dm);
// Stops a generation in flight on worker w at its next step (a joined worker: through its agent); off again
// once the pause holds.
void cancel_on(self_ptr self, size_t w, bool on);
// Starts the catch-up of a joined worker (an update queued with catch_up set).
void start_catch_up(self_ptr self, pending_update job);
// A catch-up ended: its worker serves, or is let go (its process joins again); then the next update starts.
void catch_up_finished(self_ptr self, size_t w, const msg::update_result &r);
// An update ended: what each module now holds, if it was decided (a joining worker is given the same).
void record_served(sched_state &st, const msg::update_result &r);
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
