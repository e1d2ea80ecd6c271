#include "actors/scheduler.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <variant>

#include "actors/scheduler_state.hpp"
#include "actors/update_transaction.hpp"
#include "pipeline/lora/adapter.hpp"

namespace refit::actors {

namespace sched {


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
  if (st.cancelling > 0)  // a pause with abort_all_requests cancelled generations: the flags go down again
    for (size_t w = 0; w < st.slots.size(); ++w)
      cancel_on(self, w, false);
  for (auto &w : st.pause_waiters)
    w.deliver(st.cancelling);
  st.pause_waiters.clear();
  st.cancelling = 0;
}


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
// And the worker that computed them (a joined worker numbers itself in its own process).
void stamp(msg::generation_result &r, const std::string &version, size_t w) {
  r.weight_version = version;
  r.worker = static_cast<int32_t>(w);
}
void stamp(msg::rollout_result &r, const std::string &version, size_t w) {
  r.weight_version = version;
  r.worker = static_cast<int32_t>(w);
}

const char *const shutting_down_message =
    "request cancelled: the server is shutting down";

msg::update_result not_started(const sched_state &st) {
  msg::update_result r;
  r.message = "The server is shutting down; the update was not started.";
  r.weight_version = st.weight_version;
  return r;
}

template <class Atom, class Request, class Result>
void run_on(self_ptr self, size_t w, job<Request, Result> j) {
  auto &st = self->state;
  ++st.in_flight[w];
  const std::string version = st.weight_version;
  auto promise = j.promise;
  auto enqueued = j.enqueued;
  // A joined worker can be lost mid-generation: the request then goes back to the queue.
  auto again = st.slots[w].host.empty() ? nullptr : std::make_shared<job<Request, Result>>(j);
  self->request(st.setup.workers[w], generation_timeout, Atom::value,
                std::move(j.req))
      .then(
          [self, w, version, promise, enqueued](Result &r) mutable {
            auto &st = self->state;
            --st.in_flight[w];
            stamp(r, version, w);
            ++st.stats.generations_ok;
            record_latency(
                st.stats,
                std::chrono::duration<double>(clock::now() - enqueued).count());
            promise.deliver(std::move(r));
            maybe_finish_pause(self);
            dispatch(self);
          },
          [self, w, promise, again](caf::error &e) mutable {
            auto &st = self->state;
            --st.in_flight[w];
            if (again && !st.shutting_down &&
                (msg::is(e, refit_errc::worker_lost) || e == caf::sec::request_receiver_down)) {
              spdlog::warn("worker {} failed a generation it was given ({}); it goes to another worker", w, msg::describe(e));
              st.slots[w].status = worker_status::lost;
              st.queue.push_front(std::move(*again));
              maybe_finish_pause(self);
              dispatch(self);
              return;
            }
            if (msg::is(e, refit_errc::cancelled))
              ++st.stats.generations_cancelled;
            else
              ++st.stats.generations_failed;
            if (st.shutting_down && msg::is(e, refit_errc::cancelled))
              e = msg::make_error(refit_errc::cancelled, shutting_down_message);
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

// Every queued generation and rollout gets this error; the queue is empty after.
void answer_queued(sched_state &st, refit_errc code, const char *message) {
  for (auto &job : st.queue)
    std::visit(
        [&](auto &j) { j.promise.deliver(msg::make_error(code, message)); },
        job);
  st.queue.clear();
}

void dispatch(self_ptr self) {
  auto &st = self->state;
  if (st.sleeping) {
    answer_queued(st, refit_errc::sleeping, sleeping_message);
    return;
  }
  while (!st.paused && !st.queue.empty()) {
    const size_t n = st.setup.workers.size();
    size_t best = n;
    for (size_t w = 0; w < n; ++w)
      if (st.in_flight[w] == 0 && st.slots[w].status == worker_status::serving &&
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
        cancel_on(self, w, true);
        st.cancelling += static_cast<uint64_t>(st.in_flight[w]);
      }
  maybe_finish_pause(self);
  return promise;
}

// SIGTERM past --shutdown-timeout: answer what waits, cancel what runs, take
// nothing new; replies once nothing runs.
caf::result<uint64_t> shut_down(self_ptr self) {
  auto &st = self->state;
  st.shutting_down = true;
  const uint64_t queued = st.queue.size();
  answer_queued(st, refit_errc::cancelled, shutting_down_message);
  for (auto &u : st.updates)
    if (u.catch_up < 0)  // a catch-up has no client waiting
      u.promise.deliver(not_started(st));
  st.updates.clear();
  auto running = self->make_response_promise<uint64_t>();
  self->request(caf::actor_cast<msg::scheduler_actor>(self), caf::infinite,
                msg::pause_atom::value, true)
      .then([running, queued](uint64_t cancelled) mutable {
        running.deliver(cancelled + queued);
      });
  return running;
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

std::vector<size_t> local_workers(const sched_state &st) {
  std::vector<size_t> out;
  for (size_t w = 0; w < st.slots.size(); ++w)
    if (st.slots[w].host.empty()) out.push_back(w);
  return out;
}

// Read once per host: every serving worker of this process copies what the first one staged.
std::vector<int32_t> read_once(const sched_state &st) {
  std::vector<int32_t> out(st.slots.size(), -1);
  if (!st.setup.read_once)
    return out;
  int32_t reader = -1;
  for (size_t w = 0; w < st.slots.size(); ++w) {
    if (!st.slots[w].host.empty() || st.slots[w].status != worker_status::serving)
      continue;
    if (reader < 0)
      reader = static_cast<int32_t>(w);
    else
      out[w] = reader;
  }
  return out;
}

void start_next_update(self_ptr self) {
  auto &st = self->state;
  if (st.updating || st.updates.empty() || st.memory_busy)
    return;
  st.updating = true;
  auto job = std::move(st.updates.front());
  st.updates.pop_front();
  if (job.catch_up >= 0)
    return start_catch_up(self, std::move(job));
  if (st.shutting_down) {
    job.promise.deliver(not_started(st));
    st.updating = false;
    return start_next_update(self);
  }
  if (st.sleeping) {
    msg::update_result r;
    r.message = "Cannot update weights while the server is sleeping. Call "
                "resume_memory_occupation first.";
    r.weight_version = st.weight_version;
    job.promise.deliver(std::move(r));
    st.updating = false;
    return start_next_update(self);
  }
  std::vector<size_t> members = serving_workers(st);
  if (job.req.source != msg::source_kind::checkpoint)
    for (size_t w : members)
      if (!st.slots[w].host.empty()) {
        // Tensors shared by a colocated trainer are on this host; a trainer's group counts this process's
        // workers; merged adapters would leave a joining worker nothing it could read.
        const std::string why = "update kind '" + msg::to_string(job.req.source) + "' cannot include worker " +
                                std::to_string(w) + " on " + st.slots[w].host +
                                " (joined workers take updates from disk only)";
        if (job.req.source == msg::source_kind::distributed) {
          // The trainer broadcasts anyway: this process's workers take the broadcast and drop it.
          job.req.refused = why;
          members = local_workers(st);
          break;
        }
        msg::update_result r;
        r.message = why + ". No weights were changed.";
        r.weight_version = st.weight_version;
        job.promise.deliver(std::move(r));
        st.updating = false;
        return start_next_update(self);
      }
  if (job.req.check_finite == msg::finite_check::server_default)
    job.req.check_finite = st.setup.check_finite ? msg::finite_check::on
                                                 : msg::finite_check::off;
  auto txn = spawn_update_transaction(
      self->system(),
      {self, st.setup.supervisors, st.setup.caches, st.setup.modules,
       st.setup.denoiser, st.setup.transfers, ++st.transactions,
       st.setup.allowed_roots, members, {}, read_once(st)});
  auto promise = job.promise;
  st.current_update = job.req;
  const uint64_t number = st.transactions;
  auto finished = [self, promise, number](msg::update_result r) mutable {
    auto &st = self->state;
    st.setup.adapters->end_update(number, r.success);
    record_served(st, r);
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
  // This process's workers: joined ones take no distributed updates.
  const auto workers = static_cast<int64_t>(local_workers(st).size());
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
      local_workers(st),
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
      local_workers(st),
      [self, name](size_t w) {
        return self->request(self->state.setup.transfers[w], caf::infinite,
                             msg::leave_group_atom::value, name);
      },
      [self, promise](fan_in<msg::group_result> &in) mutable {
        promise.deliver(merge(in, self->state.setup.transfers.size()));
      });
  return promise;
}

} // namespace sched

using namespace sched;


msg::scheduler_actor spawn_scheduler(caf::actor_system &sys,
                                     scheduler_setup setup) {
  return sys.spawn([setup = std::move(setup)](self_ptr self) mutable
                   -> msg::scheduler_actor::behavior_type {
    auto &st = self->state;
    st.setup = std::move(setup);
    st.in_flight.assign(st.setup.workers.size(), 0);
    for (const auto &d : st.setup.devices) {
      worker_slot slot;
      slot.device = d;
      st.slots.push_back(slot);
    }
    self->set_down_handler([self](caf::down_msg &dm) { worker_down(self, dm); });
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
          if (self->state.shutting_down)
            return msg::make_error(refit_errc::cancelled, shutting_down_message);
          auto promise = self->make_response_promise<msg::generation_result>();
          self->state.queue.push_back(
              generation_job{std::move(req), promise, clock::now()});
          dispatch(self);
          return promise;
        },
        [self](msg::rollout_atom,
               msg::rollout_request &req) -> caf::result<msg::rollout_result> {
          if (self->state.shutting_down)
            return msg::make_error(refit_errc::cancelled, shutting_down_message);
          auto promise = self->make_response_promise<msg::rollout_result>();
          self->state.queue.push_back(
              rollout_job{std::move(req), promise, clock::now()});
          dispatch(self);
          return promise;
        },
        [self](msg::update_atom,
               msg::update_request &req) -> caf::result<msg::update_result> {
          if (self->state.shutting_down)
            return not_started(self->state);
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
        [self](msg::join_worker_atom, msg::worker_offer &offer) {
          return join_worker(self, offer);
        },
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
        [self](msg::shutdown_atom) { return shut_down(self); },
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
