#include "actors/scheduler.hpp"

#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <algorithm>
#include <deque>
#include <memory>

#include "actors/cache_actor.hpp"
#include "actors/update_transaction.hpp"
#include "actors/worker_actor.hpp"

namespace refit::actors {

using msg::refit_errc;
using clock = std::chrono::steady_clock;

namespace {

constexpr auto generation_timeout = std::chrono::seconds(3600);
constexpr auto query_timeout = std::chrono::seconds(600);

struct pending_generation {
  msg::generation_request req;
  caf::typed_response_promise<msg::generation_result> promise;
  clock::time_point enqueued;
};

struct pending_update {
  msg::update_request req;
  caf::typed_response_promise<msg::update_result> promise;
};

struct sched_state {
  std::vector<msg::worker_actor> workers;
  std::vector<msg::module_supervisor_actor> supervisors;
  std::vector<msg::cache_actor> caches;
  std::vector<msg::offload_manager_actor> offloads;  // workers with layerwise offload
  std::vector<std::shared_ptr<std::atomic<bool>>> cancels;
  std::vector<std::string> modules;
  std::vector<int> in_flight;
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
  msg::scheduler_stats stats;
  static inline const char* name = "refit.scheduler";
};

using self_ptr = msg::scheduler_actor::stateful_pointer<sched_state>;

uint64_t total_in_flight(const sched_state& st) {
  uint64_t n = 0;
  for (int k : st.in_flight) n += static_cast<uint64_t>(k);
  return n;
}

void maybe_finish_pause(self_ptr self) {
  auto& st = self->state;
  if (!st.paused || total_in_flight(st) > 0 || st.pause_waiters.empty()) return;
  for (auto& c : st.cancels) c->store(false);
  for (auto& w : st.pause_waiters) w.deliver(st.cancelling);
  st.pause_waiters.clear();
  st.cancelling = 0;
}

void dispatch(self_ptr self);

void run_on(self_ptr self, size_t w, pending_generation job) {
  auto& st = self->state;
  ++st.in_flight[w];
  const std::string version = st.weight_version;  // updates commit only while nothing runs
  auto promise = job.promise;
  auto enqueued = job.enqueued;
  self->request(st.workers[w], generation_timeout, msg::generate_atom::value, job.req)
      .then(
          [self, w, version, promise, enqueued](msg::generation_result& r) mutable {
            auto& st = self->state;
            --st.in_flight[w];
            r.weight_version = version;
            ++st.stats.generations_ok;
            const double latency = std::chrono::duration<double>(clock::now() - enqueued).count();
            const auto& bounds = msg::latency_bucket_bounds_s();
            st.stats.latency_bucket_counts.resize(bounds.size() + 1);
            ++st.stats.latency_bucket_counts[std::lower_bound(bounds.begin(), bounds.end(), latency) - bounds.begin()];
            st.stats.latency_sum_s += latency;
            ++st.stats.latency_count;
            promise.deliver(std::move(r));
            maybe_finish_pause(self);
            dispatch(self);
          },
          [self, w, promise](caf::error& e) mutable {
            auto& st = self->state;
            --st.in_flight[w];
            if (e.category() == caf::atom("refit") && e.code() == static_cast<uint8_t>(refit_errc::cancelled)) ++st.stats.generations_cancelled;
            else ++st.stats.generations_failed;
            promise.deliver(std::move(e));
            maybe_finish_pause(self);
            dispatch(self);
          });
}

// Starts queued requests on idle workers (one generation per worker at a time), least-loaded first.
void dispatch(self_ptr self) {
  auto& st = self->state;
  while (!st.paused && !st.queue.empty()) {
    size_t best = st.workers.size();
    for (size_t w = 0; w < st.workers.size(); ++w)
      if (st.in_flight[w] == 0 && (best == st.workers.size() || st.in_flight[w] < st.in_flight[best])) best = w;
    if (best == st.workers.size()) return;
    auto job = std::move(st.queue.front());
    st.queue.pop_front();
    run_on(self, best, std::move(job));
  }
}

void start_next_update(self_ptr self) {
  auto& st = self->state;
  if (st.updating || st.updates.empty()) return;
  st.updating = true;
  auto job = std::move(st.updates.front());
  st.updates.pop_front();
  transaction_context ctx{self, st.supervisors, st.caches, st.modules};
  auto txn = spawn_update_transaction(self->system(), ctx);
  auto promise = job.promise;
  auto req = job.req;
  st.current_update = req;
  self->request(txn, caf::infinite, msg::update_atom::value, req)
      .then(
          [self, promise](msg::update_result& r) mutable {
            auto& st = self->state;
            if (r.success) ++st.stats.updates_ok;
            else ++st.stats.updates_failed;
            r.weight_version = st.weight_version;
            st.stats.last_timings = r.timings;
            st.stats.last_pause_s = r.timings.count("pause") ? r.timings["pause"] : 0.0;
            st.stats.last_update_bytes = 0;
            for (const auto& m : r.modules) st.stats.last_update_bytes += m.bytes;
            promise.deliver(std::move(r));
            st.updating = false;
            start_next_update(self);
          },
          [self, promise](caf::error& e) mutable {
            auto& st = self->state;
            ++st.stats.updates_failed;
            msg::update_result r;
            r.message = "update transaction failed: " + msg::describe(e);
            r.weight_version = st.weight_version;
            promise.deliver(std::move(r));
            st.updating = false;
            start_next_update(self);
          });
}

// Asks every worker for its module actors, then `each` for every selected one; `done` after all.
using module_map = std::map<std::string, msg::module_actor>;

// Asks every actor in `handles` the same question; `each` sees every answer, `done` runs once all
// answered or failed.
template <class Reply, class Handle, class Atom>
void ask_all(self_ptr self, const std::vector<Handle>& handles, Atom atom, std::function<void(size_t, Reply&)> each,
             std::function<void()> done) {
  if (handles.empty()) return done();
  auto pending = std::make_shared<size_t>(handles.size());
  for (size_t i = 0; i < handles.size(); ++i)
    self->request(handles[i], query_timeout, atom)
        .then(
            [i, each, done, pending](Reply& r) {
              each(i, r);
              if (--*pending == 0) done();
            },
            [done, pending](caf::error&) {
              if (--*pending == 0) done();
            });
}

void for_modules(self_ptr self, std::vector<size_t> workers, std::function<void(size_t, module_map&)> each,
                 std::function<void()> done) {
  auto pending = std::make_shared<size_t>(workers.size());
  if (workers.empty()) {
    done();
    return;
  }
  for (size_t w : workers)
    self->request(self->state.supervisors[w], query_timeout, msg::modules_atom::value)
        .then(
            [w, each, pending, done](std::map<std::string, msg::module_actor>& handles) {
              each(w, handles);
              if (--*pending == 0) done();
            },
            [pending, done](caf::error&) {
              if (--*pending == 0) done();
            });
}

}  // namespace

msg::scheduler_actor spawn_engine(caf::actor_system& sys, const engine_config& config) {
  std::vector<msg::worker_actor> workers;
  std::vector<msg::module_supervisor_actor> supervisors;
  std::vector<msg::cache_actor> caches;
  std::vector<msg::offload_manager_actor> offloads;
  std::vector<std::shared_ptr<std::atomic<bool>>> cancels;
  for (size_t i = 0; i < config.devices.size(); ++i) {
    cancels.push_back(std::make_shared<std::atomic<bool>>(false));
    caches.push_back(spawn_cache_actor(sys, static_cast<int32_t>(i)));
    worker_config wc{config.model_path, config.devices[i], config.dtype, static_cast<int32_t>(i), caches.back(),
                     config.dit_layerwise_offload, config.dit_offload_prefetch_size};
    auto handles = spawn_worker(sys, wc, cancels.back());
    workers.push_back(handles.worker);
    supervisors.push_back(handles.modules);
    if (handles.offload) offloads.push_back(handles.offload);
  }
  const std::string model_path = config.model_path.string();
  return sys.spawn([=](self_ptr self) -> msg::scheduler_actor::behavior_type {
    auto& st = self->state;
    st.workers = workers;
    st.supervisors = supervisors;
    st.caches = caches;
    st.offloads = offloads;
    st.cancels = cancels;
    st.modules = {"text_encoder", "transformer", "vae"};
    st.in_flight.assign(workers.size(), 0);
    st.model_path = model_path;
    for (auto& w : workers) self->link_to(w);
    for (auto& s : supervisors) self->link_to(s);
    for (auto& c : caches) self->link_to(c);
    for (auto& o : offloads) self->link_to(o);
    return {
        [self](msg::generate_atom, msg::generation_request& req) -> caf::result<msg::generation_result> {
          auto promise = self->make_response_promise<msg::generation_result>();
          self->state.queue.push_back({std::move(req), promise, clock::now()});
          dispatch(self);
          return promise;
        },
        [self](msg::update_atom, msg::update_request& req) -> caf::result<msg::update_result> {
          auto promise = self->make_response_promise<msg::update_result>();
          self->state.updates.push_back({std::move(req), promise});
          start_next_update(self);
          return promise;
        },
        [self](msg::checksum_atom, std::vector<std::string> names, int32_t worker) -> caf::result<std::map<std::string, std::string>> {
          auto& st = self->state;
          if (worker < 0 || static_cast<size_t>(worker) >= st.workers.size())
            return msg::make_error(refit_errc::invalid_request, "worker " + std::to_string(worker) + " does not exist");
          if (names.empty()) names = st.modules;
          auto promise = self->make_response_promise<std::map<std::string, std::string>>();
          auto out = std::make_shared<std::map<std::string, std::string>>();
          for_modules(self, {static_cast<size_t>(worker)},
                      [self, names, out, promise](size_t, std::map<std::string, msg::module_actor>& handles) mutable {
                        auto pending = std::make_shared<size_t>(names.size());
                        for (const auto& n : names) {
                          auto it = handles.find(n);
                          if (it == handles.end()) {
                            (*out)[n] = "not_found";
                            if (--*pending == 0) promise.deliver(*out);
                            continue;
                          }
                          self->request(it->second, query_timeout, msg::checksum_atom::value)
                              .then(
                                  [n, out, pending, promise](std::string& hex) mutable {
                                    (*out)[n] = hex;
                                    if (--*pending == 0) promise.deliver(*out);
                                  },
                                  [n, out, pending, promise](caf::error& e) mutable {
                                    (*out)[n] = "error: " + msg::describe(e);
                                    if (--*pending == 0) promise.deliver(*out);
                                  });
                        }
                      },
                      [] {});
          return promise;
        },
        [self](msg::info_atom) -> caf::result<msg::model_info> {
          auto& st = self->state;
          auto promise = self->make_response_promise<msg::model_info>();
          auto info = std::make_shared<msg::model_info>();
          info->model_path = st.model_path;
          info->weight_version = st.weight_version;
          auto handles = std::make_shared<std::vector<msg::module_actor>>();
          std::vector<size_t> all(st.workers.size());
          for (size_t w = 0; w < all.size(); ++w) all[w] = w;
          for_modules(
              self, all,
              [handles](size_t, std::map<std::string, msg::module_actor>& hs) {
                for (auto& [n, h] : hs) handles->push_back(h);
              },
              [self, handles, info, promise]() mutable {
                ask_all<msg::module_info>(
                    self, *handles, msg::info_atom::value, [info](size_t, msg::module_info& mi) { info->modules.push_back(mi); },
                    [self, info, promise]() mutable {
                      ask_all<msg::offload_info>(
                          self, self->state.offloads, msg::info_atom::value,
                          [info](size_t, msg::offload_info& o) { info->offload.push_back(o); },
                          [info, promise]() mutable { promise.deliver(*info); });
                    });
              });
          return promise;
        },
        [self](msg::stats_atom) -> caf::result<msg::scheduler_stats> {
          auto s = std::make_shared<msg::scheduler_stats>(self->state.stats);
          s->in_flight = total_in_flight(self->state);
          s->queued = self->state.queue.size();
          s->teacache.resize(self->state.caches.size());
          auto promise = self->make_response_promise<msg::scheduler_stats>();
          ask_all<msg::teacache_counters>(
              self, self->state.caches, msg::stats_atom::value, [s](size_t i, msg::teacache_counters& c) { s->teacache[i] = c; },
              [self, s, promise]() mutable {
                ask_all<msg::offload_info>(
                    self, self->state.offloads, msg::info_atom::value, [s](size_t, msg::offload_info& o) { s->offload.push_back(o); },
                    [s, promise]() mutable {
                      std::sort(s->offload.begin(), s->offload.end(), [](const auto& a, const auto& b) { return a.worker < b.worker; });
                      promise.deliver(*s);
                    });
              });
          return promise;
        },
        [self](msg::pause_atom, bool abort) -> caf::result<uint64_t> {
          auto& st = self->state;
          st.paused = true;
          auto promise = self->make_response_promise<uint64_t>();
          st.pause_waiters.push_back(promise);
          if (abort)
            for (size_t w = 0; w < st.workers.size(); ++w)
              if (st.in_flight[w] > 0) {
                st.cancels[w]->store(true);
                st.cancelling += static_cast<uint64_t>(st.in_flight[w]);
              }
          maybe_finish_pause(self);
          return promise;
        },
        [self](msg::resume_atom, bool committed) -> std::string {
          auto& st = self->state;
          if (committed) {
            ++st.update_count;
            st.weight_version = st.current_update.weight_version.empty() ? std::to_string(st.update_count) : st.current_update.weight_version;
            st.model_path = st.current_update.model_path;
          }
          st.paused = false;
          dispatch(self);
          return st.weight_version;
        },
        [self](msg::fault_atom, const std::string& module, int32_t worker, msg::fault_spec& f) -> caf::result<bool> {
          auto& st = self->state;
          if (worker < 0 || static_cast<size_t>(worker) >= st.workers.size())
            return msg::make_error(refit_errc::invalid_request, "worker " + std::to_string(worker) + " does not exist");
          auto promise = self->make_response_promise<bool>();
          for_modules(
              self, {static_cast<size_t>(worker)},
              [self, module, f, promise](size_t, std::map<std::string, msg::module_actor>& hs) mutable {
                auto it = hs.find(module);
                if (it == hs.end()) {
                  promise.deliver(msg::make_error(refit_errc::module_not_found, "no module '" + module + "'"));
                  return;
                }
                self->request(it->second, query_timeout, msg::fault_atom::value, f)
                    .then([promise](bool ok) mutable { promise.deliver(ok); },
                          [promise](caf::error& e) mutable { promise.deliver(std::move(e)); });
              },
              [] {});
          return promise;
        },
    };
  });
}

}  // namespace refit::actors
