#include "actors/scheduler.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <variant>

#include "actors/fan_out.hpp"
#include "actors/lora_ops.hpp"
#include "actors/update_transaction.hpp"
#include "pipeline/lora/adapter.hpp"
#include "pipeline/update/memory.hpp"

namespace refit::actors {

using msg::refit_errc;
using clock = std::chrono::steady_clock;

namespace {

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
  msg::scheduler_stats stats;
  static inline const char *name = "refit.scheduler";
};

using self_ptr = msg::scheduler_actor::stateful_pointer<sched_state>;

uint64_t total_in_flight(const sched_state &st) {
  uint64_t n = 0;
  for (int k : st.in_flight)
    n += static_cast<uint64_t>(k);
  return n;
}

// ---------------------------------------------------------------------------------------------
// Generation: a queue, one request per worker at a time, held back while an
// update commits

void maybe_finish_pause(self_ptr self) {
  auto &st = self->state;
  if (!st.paused || total_in_flight(st) > 0 || st.pause_waiters.empty())
    return;
  for (auto &c : st.setup.cancels)
    c->store(false);
  for (auto &w : st.pause_waiters)
    w.deliver(st.cancelling);
  st.pause_waiters.clear();
  st.cancelling = 0;
}

void dispatch(self_ptr self);

void record_latency(msg::scheduler_stats &stats, double latency) {
  const auto &bounds = msg::latency_bucket_bounds_s();
  stats.latency_bucket_counts.resize(bounds.size() + 1);
  ++stats.latency_bucket_counts[std::lower_bound(bounds.begin(), bounds.end(),
                                                 latency) -
                                bounds.begin()];
  stats.latency_sum_s += latency;
  ++stats.latency_count;
}

// Both carry the weight_version they were computed with: updates commit only
// while nothing runs.
void stamp(msg::generation_result &r, const std::string &version) {
  r.weight_version = version;
}
void stamp(msg::rollout_result &r, const std::string &version) {
  r.weight_version = version;
}

template <class Atom, class Request, class Result>
void run_on(self_ptr self, size_t w, job<Request, Result> j) {
  auto &st = self->state;
  ++st.in_flight[w];
  const std::string version = st.weight_version;
  auto promise = j.promise;
  auto enqueued = j.enqueued;
  self->request(st.setup.workers[w], generation_timeout, Atom::value,
                std::move(j.req))
      .then(
          [self, w, version, promise, enqueued](Result &r) mutable {
            auto &st = self->state;
            --st.in_flight[w];
            stamp(r, version);
            ++st.stats.generations_ok;
            record_latency(
                st.stats,
                std::chrono::duration<double>(clock::now() - enqueued).count());
            promise.deliver(std::move(r));
            maybe_finish_pause(self);
            dispatch(self);
          },
          [self, w, promise](caf::error &e) mutable {
            auto &st = self->state;
            --st.in_flight[w];
            if (msg::is(e, refit_errc::cancelled))
              ++st.stats.generations_cancelled;
            else
              ++st.stats.generations_failed;
            promise.deliver(std::move(e));
            maybe_finish_pause(self);
            dispatch(self);
          });
}

void run_on(self_ptr self, size_t w, pending_generation job) {
  if (auto *g = std::get_if<generation_job>(&job))
    run_on<msg::generate_atom>(self, w, std::move(*g));
  else
    run_on<msg::rollout_atom>(self, w, std::move(std::get<rollout_job>(job)));
}

// Starts queued requests on idle workers (one generation per worker at a time),
// least-loaded first.
const char *const sleeping_message =
    "Server is sleeping. Call resume_memory_occupation first.";

void dispatch(self_ptr self) {
  auto &st = self->state;
  if (st.sleeping) {
    for (auto &job : st.queue)
      std::visit(
          [](auto &j) {
            j.promise.deliver(
                msg::make_error(refit_errc::sleeping, sleeping_message));
          },
          job);
    st.queue.clear();
    return;
  }
  while (!st.paused && !st.queue.empty()) {
    const size_t n = st.setup.workers.size();
    size_t best = n;
    for (size_t w = 0; w < n; ++w)
      if (st.in_flight[w] == 0 &&
          (best == n || st.in_flight[w] < st.in_flight[best]))
        best = w;
    if (best == n)
      return;
    auto job = std::move(st.queue.front());
    st.queue.pop_front();
    run_on(self, best, std::move(job));
  }
}

// Stops dispatching and answers once nothing runs (cancelling what runs when
// `abort`).
caf::result<uint64_t> pause(self_ptr self, bool abort) {
  auto &st = self->state;
  st.paused = true;
  auto promise = self->make_response_promise<uint64_t>();
  st.pause_waiters.push_back(promise);
  if (abort)
    for (size_t w = 0; w < st.setup.workers.size(); ++w)
      if (st.in_flight[w] > 0) {
        st.setup.cancels[w]->store(true);
        st.cancelling += static_cast<uint64_t>(st.in_flight[w]);
      }
  maybe_finish_pause(self);
  return promise;
}

std::string resume(self_ptr self, bool committed) {
  auto &st = self->state;
  if (committed) {
    ++st.update_count;
    st.weight_version = st.lora.version_after(
        st.current_update, st.weight_version, std::to_string(st.update_count));
    if (st.current_update.source == msg::source_kind::checkpoint)
      st.model_path = st.current_update.model_path;
  }
  st.paused = false;
  dispatch(self);
  return st.weight_version;
}

// ---------------------------------------------------------------------------------------------
// Updates: one transaction at a time, the rest queued

void start_next_update(self_ptr self) {
  auto &st = self->state;
  if (st.updating || st.updates.empty() || st.memory_busy)
    return;
  st.updating = true;
  auto job = std::move(st.updates.front());
  st.updates.pop_front();
  if (st.sleeping) {
    msg::update_result r;
    r.message = "Cannot update weights while the server is sleeping. Call "
                "resume_memory_occupation first.";
    r.weight_version = st.weight_version;
    job.promise.deliver(std::move(r));
    st.updating = false;
    return start_next_update(self);
  }
  auto txn = spawn_update_transaction(
      self->system(),
      {self, st.setup.supervisors, st.setup.caches, st.setup.modules,
       st.setup.denoiser, st.setup.transfers, ++st.transactions});
  auto promise = job.promise;
  st.current_update = job.req;
  const uint64_t number = st.transactions;
  auto finished = [self, promise, number](msg::update_result r) mutable {
    auto &st = self->state;
    st.setup.adapters->end_update(number, r.success);
    if (r.success) {
      ++st.stats.updates_ok;
      st.lora.committed(st.current_update, st.setup.denoiser);
    } else
      ++st.stats.updates_failed;
    r.weight_version = st.weight_version;
    st.stats.last_timings = r.timings;
    st.stats.last_pause_s = r.timings.count("pause") ? r.timings["pause"] : 0.0;
    st.stats.last_update_bytes = 0;
    for (const auto &m : r.modules)
      st.stats.last_update_bytes += m.bytes;
    promise.deliver(std::move(r));
    st.updating = false;
    start_next_update(self);
  };
  self->request(txn, caf::infinite, msg::update_atom::value, job.req)
      .then(
          [finished](msg::update_result &r) mutable { finished(std::move(r)); },
          [self, finished](caf::error &e) mutable {
            // The transaction is gone (it cannot have decided: it replies after
            // resuming). Generation must not stay held back by a pause it can
            // no longer end.
            if (self->state.paused)
              resume(self, false);
            msg::update_result r;
            r.message = "update transaction failed: " + msg::describe(e);
            finished(std::move(r));
          });
}

// ---------------------------------------------------------------------------------------------
// Trainers' groups: every worker joins as its own rank (rank_offset + worker
// index)

// One answer for all workers: SGLang's sentence when they agree, else each
// worker's.
msg::group_result merge(fan_in<msg::group_result> &in, size_t workers) {
  msg::group_result out;
  out.success = in.errors.empty();
  std::vector<std::string> distinct;
  for (size_t w = 0; w < workers; ++w) {
    std::string m;
    if (in.errors.count(w))
      m = "worker " + std::to_string(w) + ": " + msg::describe(in.errors.at(w));
    else if (in.replies.count(w)) {
      out.success &= in.replies.at(w).success;
      m = in.replies.at(w).message;
    }
    if (std::find(distinct.begin(), distinct.end(), m) == distinct.end())
      distinct.push_back(m);
  }
  for (const auto &m : distinct)
    out.message += (out.message.empty() ? "" : " | ") + m;
  return out;
}

caf::result<msg::group_result> join_group(self_ptr self,
                                          const msg::group_request &req) {
  auto &st = self->state;
  const auto workers = static_cast<int64_t>(st.setup.transfers.size());
  std::string bad;
  if (req.group_name.empty())
    bad = "group_name must not be empty";
  else if (req.backend != "nccl" && req.backend != "gloo")
    bad = "backend must be 'nccl' or 'gloo', got '" + req.backend + "'";
  else if (req.master_address.empty())
    bad = "master_address must not be empty";
  else if (req.master_port < 1 || req.master_port > 65535)
    bad = "master_port must be in 1..65535, got " +
          std::to_string(req.master_port);
  else if (req.rank_offset < 1)
    bad = "rank_offset must be at least 1 (rank 0 is the trainer), got " +
          std::to_string(req.rank_offset);
  else if (static_cast<int64_t>(req.rank_offset) + workers > req.world_size)
    bad = "world_size " + std::to_string(req.world_size) +
          " has no room for this server's " + std::to_string(workers) +
          " worker rank(s) from rank_offset " +
          std::to_string(req.rank_offset) + " (ranks " +
          std::to_string(req.rank_offset) + ".." +
          std::to_string(req.rank_offset + workers - 1) + ")";
  if (!bad.empty())
    return msg::group_result{
        false, "Failed to initialize custom process group: " + bad + "."};
  auto promise = self->make_response_promise<msg::group_result>();
  fan_out<msg::group_result>(
      indices(st.setup.transfers.size()),
      [self, req](size_t w) {
        return self->request(
            self->state.setup.transfers[w], caf::infinite,
            msg::join_group_atom::value, req,
            static_cast<int32_t>(req.rank_offset + static_cast<int32_t>(w)));
      },
      [self, req, promise](fan_in<msg::group_result> &in) mutable {
        auto &st = self->state;
        msg::group_result out = merge(in, st.setup.transfers.size());
        if (!out.success) {
          // All or none: the workers that joined leave again, so that the
          // trainer can simply retry.
          for (auto &[w, r] : in.replies)
            if (r.success)
              self->request(st.setup.transfers[w], query_timeout,
                            msg::leave_group_atom::value, req.group_name)
                  .then([](msg::group_result &) {});
        }
        promise.deliver(out);
      });
  return promise;
}

caf::result<msg::group_result> leave_group(self_ptr self,
                                           const std::string &name) {
  auto &st = self->state;
  auto promise = self->make_response_promise<msg::group_result>();
  fan_out<msg::group_result>(
      indices(st.setup.transfers.size()),
      [self, name](size_t w) {
        return self->request(self->state.setup.transfers[w], caf::infinite,
                             msg::leave_group_atom::value, name);
      },
      [self, promise](fan_in<msg::group_result> &in) mutable {
        promise.deliver(merge(in, self->state.setup.transfers.size()));
      });
  return promise;
}

// ---------------------------------------------------------------------------------------------
// Queries

// The module actors of workers `which` (module name -> actor, per worker), and
// the workers whose supervisor did not answer.
void module_actors(self_ptr self, std::vector<size_t> which,
                   std::function<void(fan_in<module_map> &)> done) {
  fan_out<module_map>(
      which,
      [self](size_t w) {
        return self->request(self->state.setup.supervisors[w], query_timeout,
                             msg::modules_atom::value);
      },
      std::move(done));
}

caf::result<std::map<std::string, std::string>>
checksums(self_ptr self, const msg::checksum_request &req) {
  auto &st = self->state;
  const int32_t worker = req.worker;
  std::vector<std::string> names = req.modules;
  const msg::checksum_format format = req.format;
  if (worker < 0 || static_cast<size_t>(worker) >= st.setup.workers.size())
    return msg::make_error(refit_errc::invalid_request,
                           "worker " + std::to_string(worker) +
                               " does not exist");
  if (names.empty())
    names = st.setup.modules;
  auto promise =
      self->make_response_promise<std::map<std::string, std::string>>();
  module_actors(self, {static_cast<size_t>(worker)},
                [self, names, format, promise](fan_in<module_map> &in) mutable {
                  if (!in.errors.empty()) {
                    promise.deliver(msg::make_error(
                        refit_errc::phase_failed,
                        "worker " + std::to_string(in.errors.begin()->first) +
                            " did not answer: " +
                            msg::describe(in.errors.begin()->second)));
                    return;
                  }
                  module_map actors = std::move(in.replies.begin()->second);
                  std::map<std::string, std::string> out;
                  std::vector<size_t> known;
                  for (size_t k = 0; k < names.size(); ++k) {
                    if (actors.count(names[k]))
                      known.push_back(k);
                    else
                      out[names[k]] = "not_found";
                  }
                  fan_out<std::string>(
                      known,
                      [self, names, actors, format](size_t k) {
                        return self->request(actors.at(names[k]), query_timeout,
                                             msg::checksum_atom::value, format);
                      },
                      [names, out, promise](fan_in<std::string> &in) mutable {
                        for (auto &[k, hex] : in.replies)
                          out[names[k]] = hex;
                        for (auto &[k, e] : in.errors)
                          out[names[k]] = "error: " + msg::describe(e);
                        promise.deliver(out);
                      });
                });
  return promise;
}

// Answers of the offload managers, by worker.
void offload_infos(self_ptr self,
                   std::function<void(std::vector<msg::offload_info>)> done) {
  fan_out<msg::offload_info>(
      indices(self->state.setup.offloads.size()),
      [self](size_t i) {
        return self->request(self->state.setup.offloads[i], query_timeout,
                             msg::info_atom::value);
      },
      [done](fan_in<msg::offload_info> &in) {
        std::vector<msg::offload_info> out;
        for (auto &[i, o] : in.replies)
          out.push_back(o);
        std::sort(out.begin(), out.end(), [](const auto &a, const auto &b) {
          return std::tie(a.worker, a.module) < std::tie(b.worker, b.module);
        });
        done(std::move(out));
      });
}

// What the module actors of workers `which` report; `done` gets one reply (or
// error) per module that answered the supervisor's listing.
void module_infos(self_ptr self, std::vector<size_t> which,
                  std::function<void(fan_in<msg::module_info> &)> done) {
  module_actors(self, std::move(which),
                [self, done](fan_in<module_map> &in) mutable {
                  std::vector<msg::module_actor> actors;
                  for (auto &[w, map] : in.replies)
                    for (auto &[name, actor] : map)
                      actors.push_back(actor);
                  fan_out<msg::module_info>(
                      indices(actors.size()),
                      [self, actors](size_t i) {
                        return self->request(actors[i], query_timeout,
                                             msg::info_atom::value);
                      },
                      std::move(done));
                });
}

caf::result<msg::model_info> model_info(self_ptr self) {
  auto &st = self->state;
  auto promise = self->make_response_promise<msg::model_info>();
  msg::model_info info;
  info.model_path = st.model_path;
  info.weight_version = st.weight_version;
  info.sleeping = st.sleeping;
  module_infos(
      self, indices(st.setup.workers.size()),
      [self, info, promise](fan_in<msg::module_info> &in) mutable {
        for (auto &[i, mi] : in.replies)
          info.modules.push_back(mi);
        offload_infos(self, [info, promise](
                                std::vector<msg::offload_info> offload) mutable {
          info.offload = std::move(offload);
          promise.deliver(info);
        });
      });
  return promise;
}

// ---------------------------------------------------------------------------------------------
// Device memory: released between rollouts for a colocated trainer, resumed before the next

uint64_t devices_used(const sched_state &st) {
  uint64_t n = 0;
  for (const auto &d : st.setup.devices)
    n += update::device_used_bytes(c10::Device(d));
  return n;
}

// Every module actor of every worker does `Atom`; on a failure the ones that
// did are undone with `Undo`, so the workers stay alike.
template <class Atom, class Undo>
void memory_step(self_ptr self, caf::typed_response_promise<msg::memory_result> promise,
                 msg::memory_result r, bool sleeping_after,
                 clock::time_point t0) {
  module_actors(
      self, indices(self->state.setup.workers.size()),
      [self, promise, r, sleeping_after, t0](fan_in<module_map> &in) mutable {
        std::vector<msg::module_actor> actors;
        for (auto &[w, map] : in.replies)
          for (auto &[name, actor] : map)
            actors.push_back(actor);
        const bool all_listed = in.errors.empty();
        fan_out<msg::module_report>(
            indices(actors.size()),
            [self, actors](size_t i) {
              return self->request(actors[i], query_timeout, Atom::value);
            },
            [self, actors, promise, r, sleeping_after, all_listed,
             t0](fan_in<msg::module_report> &in) mutable {
              auto &st = self->state;
              for (auto &[i, rep] : in.replies)
                r.moved_bytes += rep.bytes;
              if (in.errors.empty() && all_listed) {
                st.sleeping = sleeping_after;
                r.success = true;
                if (r.moved_bytes == 0)
                  r.message = sleeping_after ? "nothing to release on the devices (the weights are in host memory); "
                                               "generation waits for resume_memory_occupation"
                                             : "resumed (the weights stayed in host memory)";
              } else {
                r.message = in.errors.empty()
                                ? std::string("a worker did not list its modules")
                                : msg::describe(in.errors.begin()->second);
                for (auto &[i, rep] : in.replies)  // undo where it happened
                  self->request(actors[i], query_timeout, Undo::value);
              }
              r.sleeping = st.sleeping;
              r.device_used_after = devices_used(st);
              r.seconds = std::chrono::duration<double>(clock::now() - t0).count();
              st.memory_busy = false;
              st.paused = false;  // a release paused generation while the weights moved
              spdlog::info("memory: {} ({:.1f} MB moved in {:.3f} s; devices use {:.1f} MB, were {:.1f} MB)",
                           r.success ? r.message : "failed: " + r.message, r.moved_bytes / 1e6, r.seconds,
                           r.device_used_after / 1e6, r.device_used_before / 1e6);
              promise.deliver(r);
              dispatch(self);
              start_next_update(self);
            });
      });
}

caf::result<msg::memory_result> release_memory(self_ptr self) {
  auto &st = self->state;
  msg::memory_result r;
  r.device_used_before = devices_used(st);
  if (st.sleeping || st.memory_busy || st.updating) {
    r.success = st.sleeping;
    r.sleeping = st.sleeping;
    r.message = st.sleeping ? "already sleeping"
                            : "a weight update or a memory change is in "
                              "progress; try again when it ends";
    r.device_used_after = r.device_used_before;
    return r;
  }
  st.memory_busy = true;
  auto promise = self->make_response_promise<msg::memory_result>();
  const auto t0 = clock::now();
  // Nothing generates while the weights move.
  self->request(caf::actor_cast<msg::scheduler_actor>(self), caf::infinite,
                msg::pause_atom::value, false)
      .then([self, promise, r, t0](uint64_t) mutable {
        r.message = "released GPU memory (moved the weights to pinned host memory)";
        memory_step<msg::release_memory_atom, msg::resume_memory_atom>(
            self, promise, r, true, t0);
      });
  return promise;
}

caf::result<msg::memory_result> resume_memory(self_ptr self) {
  auto &st = self->state;
  msg::memory_result r;
  r.device_used_before = devices_used(st);
  if (!st.sleeping || st.memory_busy) {
    r.success = !st.sleeping;
    r.sleeping = st.sleeping;
    r.message = !st.sleeping ? "already awake"
                             : "a memory change is in progress; try again "
                               "when it ends";
    r.device_used_after = r.device_used_before;
    return r;
  }
  st.memory_busy = true;
  auto promise = self->make_response_promise<msg::memory_result>();
  r.message = "resumed GPU memory (restored the weights to their devices)";
  memory_step<msg::resume_memory_atom, msg::release_memory_atom>(
      self, promise, r, false, clock::now());
  return promise;
}

// SGLang's update_weights_from_tensor_checker: worker 0's per-tensor hashes.
caf::result<std::map<std::string, std::string>>
tensor_hashes(self_ptr self, const std::string &module,
              const std::vector<std::string> &names) {
  auto promise =
      self->make_response_promise<std::map<std::string, std::string>>();
  module_actors(
      self, {0},
      [self, module, names, promise](fan_in<module_map> &in) mutable {
        const module_map *map =
            in.replies.empty() ? nullptr : &in.replies.begin()->second;
        auto it = map ? map->find(module) : module_map::const_iterator{};
        if (!map || it == map->end()) {
          promise.deliver(msg::make_error(
              refit_errc::module_not_found,
              "Module '" + module + "' is not initialized"));
          return;
        }
        self->request(it->second, query_timeout,
                      msg::tensor_hashes_atom::value, names)
            .then(
                [promise](std::map<std::string, std::string> &m) mutable {
                  promise.deliver(std::move(m));
                },
                [promise](caf::error &e) mutable { promise.deliver(e); });
      });
  return promise;
}

// SGLang's /v1/list_loras: the adapters loaded, and what worker 0's modules
// hold merged now.
caf::result<msg::lora_status> list_loras(self_ptr self) {
  auto &st = self->state;
  msg::lora_status status;
  for (const auto &[nickname, path] : st.setup.adapters->list())
    status.loaded.push_back({nickname, path, 1.0, 0, false});
  auto promise = self->make_response_promise<msg::lora_status>();
  module_infos(self, {0},
               [status, promise](fan_in<msg::module_info> &in) mutable {
                 if (!in.errors.empty() || in.replies.empty()) {
                   promise.deliver(msg::make_error(
                       refit_errc::phase_failed,
                       in.errors.empty()
                           ? std::string("no module of worker 0 answered")
                           : msg::describe(in.errors.begin()->second)));
                   return;
                 }
                 for (auto &[i, mi] : in.replies)
                   if (!mi.adapters.empty())
                     status.active[mi.name] = mi.adapters;
                 promise.deliver(status);
               });
  return promise;
}

caf::result<msg::scheduler_stats> stats(self_ptr self) {
  auto &st = self->state;
  msg::scheduler_stats s = st.stats;
  s.in_flight = total_in_flight(st);
  s.queued = st.queue.size();
  s.teacache.resize(st.setup.caches.size());
  auto promise = self->make_response_promise<msg::scheduler_stats>();
  fan_out<msg::teacache_counters>(
      indices(st.setup.caches.size()),
      [self](size_t i) {
        return self->request(self->state.setup.caches[i], query_timeout,
                             msg::stats_atom::value);
      },
      [self, s, promise](fan_in<msg::teacache_counters> &in) mutable {
        for (auto &[i, c] : in.replies)
          s.teacache[i] = c;
        offload_infos(
            self, [s, promise](std::vector<msg::offload_info> offload) mutable {
              s.offload = std::move(offload);
              promise.deliver(s);
            });
      });
  return promise;
}

caf::result<bool> inject_fault(self_ptr self, const std::string &module,
                               int32_t worker, const msg::fault_spec &f) {
  auto &st = self->state;
  if (worker < 0 || static_cast<size_t>(worker) >= st.setup.workers.size())
    return msg::make_error(refit_errc::invalid_request,
                           "worker " + std::to_string(worker) +
                               " does not exist");
  auto promise = self->make_response_promise<bool>();
  module_actors(
      self, {static_cast<size_t>(worker)},
      [self, module, f, promise](fan_in<module_map> &in) mutable {
        if (!in.errors.empty()) {
          promise.deliver(in.errors.begin()->second);
          return;
        }
        module_map actors = std::move(in.replies.begin()->second);
        auto it = actors.find(module);
        if (it == actors.end()) {
          promise.deliver(msg::make_error(refit_errc::module_not_found,
                                          "no module '" + module + "'"));
          return;
        }
        self->request(it->second, query_timeout, msg::fault_atom::value, f)
            .then([promise](bool ok) mutable { promise.deliver(ok); },
                  [promise](caf::error &e) mutable {
                    promise.deliver(std::move(e));
                  });
      });
  return promise;
}

} // namespace

msg::scheduler_actor spawn_scheduler(caf::actor_system &sys,
                                     scheduler_setup setup) {
  return sys.spawn([setup = std::move(setup)](self_ptr self) mutable
                   -> msg::scheduler_actor::behavior_type {
    auto &st = self->state;
    st.setup = std::move(setup);
    st.in_flight.assign(st.setup.workers.size(), 0);
    st.model_path = st.setup.model_path;
    for (auto &w : st.setup.workers)
      self->link_to(w);
    for (auto &s : st.setup.supervisors)
      self->link_to(s);
    for (auto &c : st.setup.caches)
      self->link_to(c);
    for (auto &o : st.setup.offloads)
      self->link_to(o);
    for (auto &t : st.setup.transfers)
      self->link_to(t);
    return {
        [self](msg::generate_atom, msg::generation_request &req)
            -> caf::result<msg::generation_result> {
          auto promise = self->make_response_promise<msg::generation_result>();
          self->state.queue.push_back(
              generation_job{std::move(req), promise, clock::now()});
          dispatch(self);
          return promise;
        },
        [self](msg::rollout_atom,
               msg::rollout_request &req) -> caf::result<msg::rollout_result> {
          auto promise = self->make_response_promise<msg::rollout_result>();
          self->state.queue.push_back(
              rollout_job{std::move(req), promise, clock::now()});
          dispatch(self);
          return promise;
        },
        [self](msg::update_atom,
               msg::update_request &req) -> caf::result<msg::update_result> {
          auto promise = self->make_response_promise<msg::update_result>();
          self->state.updates.push_back({std::move(req), promise});
          start_next_update(self);
          return promise;
        },
        [self](msg::lora_atom,
               msg::lora_request &req) -> caf::result<msg::update_result> {
          auto &st = self->state;
          auto planned =
              st.lora.plan(req, st.setup.denoiser, *st.setup.adapters);
          if (auto *why = std::get_if<std::string>(&planned)) {
            msg::update_result r;
            r.message = *why;
            r.weight_version = st.weight_version;
            return r;
          }
          auto promise = self->make_response_promise<msg::update_result>();
          st.updates.push_back(
              {std::get<msg::update_request>(std::move(planned)), promise});
          start_next_update(self);
          return promise;
        },
        [self](msg::list_loras_atom) { return list_loras(self); },
        [self](msg::release_memory_atom) { return release_memory(self); },
        [self](msg::resume_memory_atom) { return resume_memory(self); },
        [self](msg::tensor_hashes_atom, const std::string &module,
               const std::vector<std::string> &names) {
          return tensor_hashes(self, module, names);
        },
        [self](msg::join_group_atom, const msg::group_request &req) {
          return join_group(self, req);
        },
        [self](msg::leave_group_atom, const std::string &name) {
          return leave_group(self, name);
        },
        [self](msg::checksum_atom, const msg::checksum_request &req) {
          return checksums(self, req);
        },
        [self](msg::info_atom) { return model_info(self); },
        [self](msg::stats_atom) { return stats(self); },
        [self](msg::pause_atom, bool abort) { return pause(self, abort); },
        [self](msg::resume_atom, bool committed) {
          return resume(self, committed);
        },
        [self](msg::fault_atom, const std::string &module, int32_t worker,
               const msg::fault_spec &f) {
          return inject_fault(self, module, worker, f);
        },
    };
  });
}

} // namespace refit::actors
