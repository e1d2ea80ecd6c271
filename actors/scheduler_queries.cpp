// The scheduler's queries and device-memory operations (scheduler_state.hpp): checksums, model info, per-tensor
// hashes, LoRA status, release/resume of device memory, stats and fault injection.
#include <spdlog/spdlog.h>

#include "actors/scheduler_state.hpp"
#include "pipeline/lora/adapter.hpp"
#include "pipeline/update/memory.hpp"

namespace refit::actors::sched {

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
  if (st.slots[worker].status != worker_status::serving)
    return msg::make_error(refit_errc::invalid_request,
                           "worker " + std::to_string(worker) + " is " +
                               to_string(st.slots[worker].status));
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
                  std::vector<size_t> worker_of;
                  for (auto &[w, map] : in.replies)
                    for (auto &[name, actor] : map) {
                      actors.push_back(actor);
                      worker_of.push_back(w);
                    }
                  fan_out<msg::module_info>(
                      indices(actors.size()),
                      [self, actors](size_t i) {
                        return self->request(actors[i], query_timeout,
                                             msg::info_atom::value);
                      },
                      [done, worker_of](fan_in<msg::module_info> &in) {
                        // A joined worker numbers itself in its own process.
                        for (auto &[i, mi] : in.replies)
                          mi.worker = static_cast<int32_t>(worker_of[i]);
                        done(in);
                      });
                });
}

caf::result<msg::model_info> model_info(self_ptr self) {
  auto &st = self->state;
  auto promise = self->make_response_promise<msg::model_info>();
  msg::model_info info;
  info.model_path = st.model_path;
  info.weight_version = st.weight_version;
  info.sleeping = st.sleeping;
  for (size_t w = 0; w < st.slots.size(); ++w)
    info.workers.push_back({static_cast<int32_t>(w), st.slots[w].device,
                            st.slots[w].host, to_string(st.slots[w].status)});
  module_infos(
      self, serving_workers(st),
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
  for (const auto &d : st.setup.devices)  // this process's devices
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
      self, serving_workers(self->state),
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

} // namespace refit::actors::sched
