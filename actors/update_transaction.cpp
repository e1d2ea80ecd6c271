// The update transaction (DESIGN.md section 3): one actor per update, whose participants are the
// target modules on every worker. The phases run top to bottom in this file:
//
//   plan ─► [receive] ─► join ─► validate ─► stage ─► pause ─► commit ──every commit ok──► decide ─► flush ─► finalize ─► resume, release, reply
//     │         │          │        │          │        │        │         (the update is decided:     │
//     │         │          │        │          │        │        │          the model moves forward)   └ one does not finalize:
//     │         │          │        │          │        │        │                                       conclude (update_recovery.cpp)
//     └─────────┴──────────┴────────┴──────────┴────────┴─► ABORT: discard the staged, settle every participant, resume, release, reply
//                                                           (nothing was committed: no weight changed)
//                                                   │
//                           a commit failed ────────┴─► COMPENSATE: settle the failed, roll back every other one,
//                                                       settle those whose rollback failed, resume, reply
//
// receive (distributed updates only): every worker's transfer actor checks the trainer's announcement
// against its modules and receives the broadcast into memory; no module is touched, so a trainer that
// fails mid-transfer only aborts. The modules then update from what their worker received, which is
// released (release) before the reply.
// Generation is held back from pause to resume. Once every commit has succeeded the update is decided:
// each worker records it (decide), so a module actor that dies from then on is replaced by one that
// keeps the new weights, and generation resumes on the new weight_version whatever fails after that.
// The outcome is computed in these functions and worded in update_outcome.cpp.
#include "actors/update_transaction.hpp"

#include <spdlog/spdlog.h>

#include "actors/fan_out.hpp"
#include "actors/update_outcome.hpp"
#include "actors/update_plan.hpp"
#include "actors/update_state.hpp"

namespace refit::actors {

namespace txn {

double since(clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); }

void record_phase(self_ptr self, const char* phase) {
  self->state.result.timings[phase] = since(self->state.phase_start);
  self->state.phase_start = clock::now();
}

std::string who(const participant& p) { return "module '" + p.module + "' (worker " + std::to_string(p.worker) + ")"; }

namespace {

// The participants in phase `at`.
std::vector<size_t> in_phase(const state& st, phase at) {
  std::vector<size_t> out;
  for (size_t i = 0; i < st.parts.size(); ++i)
    if (st.parts[i].at == at) out.push_back(i);
  return out;
}


// Marks the participants that failed the phase; returns the first failure in participant order, worded
// (empty when every participant succeeded).
std::string first_failure(self_ptr self, fan_in<msg::module_report>& in, const char* phase_name) {
  for (auto& [i, error] : in.errors) self->state.parts[i].at = phase::failed;
  if (in.errors.empty()) return {};
  const auto& [i, error] = *in.errors.begin();
  return phase_failure(self->state.parts[i], phase_name, msg::describe(error));
}

void refuse_broadcast(self_ptr self, const std::string& why);
void receive(self_ptr self, update_plan plan);
void join(self_ptr self, std::map<std::string, msg::weight_source> planned);
void validate(self_ptr self);
void stage(self_ptr self);
void pause(self_ptr self);
void commit(self_ptr self);
void decided(self_ptr self);
void abort(self_ptr self, const std::string& why);
void compensate(self_ptr self, fan_in<msg::module_report>& commit_replies);
void resume_and_reply(self_ptr self, bool decided);
void reply(self_ptr self);

// ---------------------------------------------------------------------------------------------
// plan, join

// Plans the sources (a distributed update then receives), then joins the participants. Nothing is
// touched if the plan fails.
void start(self_ptr self, const msg::update_request& req) {
  auto& st = self->state;
  st.req = req;
  st.start = st.phase_start = clock::now();
  st.result.weight_version = req.weight_version;
  if (!st.ctx.preplanned.empty()) {
    record_phase(self, "plan");
    return join(self, st.ctx.preplanned);
  }
  update_plan plan = plan_update(req, st.ctx.pipeline_modules, st.ctx.denoiser, st.ctx.update, st.ctx.allowed_roots);
  if (static_cast<uint8_t>(req.mode) > static_cast<uint8_t>(msg::update_mode::in_place))
    plan.error = "mode must be auto, staged or in_place, got '" + msg::to_string(req.mode) + "'";
  if (req.source == msg::source_kind::tensor) {
    // SGLang's rule: one payload for all, one per worker, or one per GPU (payload_gpu_uuids).
    const size_t n = req.payloads.size(), workers = st.ctx.members.size();
    if (plan.error.empty() && n != 1 && n != workers && (n == 0 || req.payloads.front().gpu_uuid.empty()))
      plan.error = "serialized_named_tensors size must be 1 or world_size (" + std::to_string(workers) + "), got " + std::to_string(n);
    if (!plan.error.empty()) {
      st.result.message = plan.error + ". No weights were changed.";
      return reply(self);
    }
    record_phase(self, "plan");
    return receive(self, std::move(plan));
  }
  if (req.source == msg::source_kind::distributed) {
    // The trainer broadcasts what it announced however refit answers: a refused request still has every
    // worker take the broadcast (and drop it).
    if (!req.refused.empty()) plan.error = req.refused;
    if (!plan.error.empty()) return refuse_broadcast(self, plan.error);
    record_phase(self, "plan");
    return receive(self, std::move(plan));
  }
  if (!plan.error.empty()) {
    st.result.message = plan.error + ". No weights were changed.";
    return reply(self);
  }
  record_phase(self, "plan");
  join(self, std::move(plan.sources));
}

// A refused distributed update: every worker drops the broadcast, so the group stays in step with the
// trainer (or leaves the group when the broadcast's size is unknown), and the reply says which.
void refuse_broadcast(self_ptr self, const std::string& why) {
  auto& st = self->state;
  msg::receive_request r;
  r.update = st.ctx.update;
  r.group_name = st.req.group_name;
  r.flattened_bucket = st.req.flattened_bucket;
  r.refused = why;
  for (const auto& t : st.req.tensors) r.tensors.push_back({"", t.name, t.name, t.dtype, t.shape});
  fan_out<msg::receive_report>(
      st.ctx.members,
      [self, r](size_t w) { return self->request(self->state.ctx.transfers[w], caf::infinite, msg::receive_atom::value, r); },
      [self, why](fan_in<msg::receive_report>& in) {
        auto& st = self->state;
        std::string outcome = why;
        if (!in.errors.empty()) outcome = msg::describe(in.errors.begin()->second);
        if (!outcome.empty() && outcome.back() != '.') outcome += '.';
        st.result.message = outcome + " No weights were changed.";
        reply(self);
      });
}

// Every worker receives the announced tensors (each is a rank of the trainer's group; rank 0 broadcasts
// to all of them at once), or the update stops with nothing touched.
void receive(self_ptr self, update_plan plan) {
  auto& st = self->state;
  st.received = true;
  fan_out<msg::receive_report>(
      st.ctx.members,
      [self, req = plan.receive](size_t w) { return self->request(self->state.ctx.transfers[w], caf::infinite, msg::receive_atom::value, req); },
      [self, sources = std::move(plan.sources)](fan_in<msg::receive_report>& in) mutable {
        auto& st = self->state;
        if (!in.errors.empty()) {
          const auto& [w, e] = *in.errors.begin();
          std::string why = msg::describe(e);
          if (!why.empty() && why.back() == '.') why.pop_back();
          st.result.message = (st.req.source == msg::source_kind::tensor ? "Failed to open the trainer's tensors on worker "
                                                                          : "Failed to receive weights on worker ") +
                              std::to_string(w) + ": " + why + ". No weights were changed. " + all_rolled_back;
          return reply(self);
        }
        uint64_t bytes = 0;
        double slowest = 0;
        for (auto& [w, r] : in.replies) {
          bytes = r.bytes;
          slowest = std::max(slowest, r.seconds);
        }
        spdlog::info("update {}: every worker received {:.1f} MB in {:.3f} s", source_label(st.req), bytes / 1e6, slowest);
        record_phase(self, "receive");
        join(self, std::move(sources));
      });
}

// Asks every worker for its module actors and makes one participant per target module and worker.
void join(self_ptr self, std::map<std::string, msg::weight_source> planned) {
  auto& st = self->state;
  fan_out<std::map<std::string, msg::module_actor>>(
      st.ctx.members,
      [self](size_t w) { return self->request(self->state.ctx.workers[w], phase_timeout, msg::modules_atom::value); },
      [self, sources = std::move(planned)](fan_in<std::map<std::string, msg::module_actor>>& in) {
        auto& st = self->state;
        std::string missing;
        for (auto& [w, handles] : in.replies)
          for (const auto& [module, source] : sources) {
            auto it = handles.find(module);
            if (it == handles.end()) {
              missing = "Worker " + std::to_string(w) + " has no module '" + module + "'";
              continue;
            }
            participant p;
            p.worker = static_cast<int32_t>(w);
            p.module = module;
            p.source = source;
            p.handle = it->second;
            self->monitor(p.handle);
            st.parts.push_back(std::move(p));
          }
        if (!in.errors.empty()) {
          const auto& [w, e] = *in.errors.begin();
          return abort(self, "Worker " + std::to_string(w) + " did not answer: " + msg::describe(e));
        }
        if (!missing.empty()) return abort(self, missing);
        validate(self);
      });
}

// ---------------------------------------------------------------------------------------------
// validate, stage: generation goes on

void validate(self_ptr self) {
  ask_parts(self, indices(self->state.parts.size()),
            [self](participant& p) { return self->request(p.handle, phase_timeout, msg::validate_atom::value, p.source); },
            [self](fan_in<msg::module_report>& in) {
              auto& st = self->state;
              if (auto failure = first_failure(self, in, "validate"); !failure.empty()) return abort(self, failure);
              uint64_t bytes = 0;
              for (auto& [i, r] : in.replies) {
                st.parts[i].at = phase::validated;
                bytes += r.bytes;
              }
              spdlog::info("update {}: validated {} module(s), {:.1f} MB", source_label(st.req), st.parts.size(), bytes / 1e6);
              record_phase(self, "validate");
              stage(self);
            });
}

void staged(self_ptr self, fan_in<msg::module_report>& in);

// The worker whose staged copy participant i's worker takes (read once per host), or -1.
int32_t copies_from(const state& st, const participant& p) {
  if (p.source.kind != msg::source_kind::checkpoint || static_cast<size_t>(p.worker) >= st.ctx.copy_from.size()) return -1;
  return st.ctx.copy_from[static_cast<size_t>(p.worker)];
}

// The stage phase in flight: the replies so far, how many are still due, and who stages after whom.
struct staging {
  fan_in<msg::module_report> in;
  size_t left = 0;
  std::map<size_t, std::vector<size_t>> after;  // a reader -> the participants copying from it
};

void stage_one(self_ptr self, const std::shared_ptr<staging>& g, size_t i, int32_t from);

// Participant i answered: those copying from it stage now (from its copy when it staged one), and once every
// participant answered the phase goes on.
void stage_answered(self_ptr self, const std::shared_ptr<staging>& g, size_t i, int32_t copy_from) {
  if (auto it = g->after.find(i); it != g->after.end())
    for (size_t d : it->second) stage_one(self, g, d, copy_from);
  if (--g->left == 0) staged(self, g->in);
}

void stage_one(self_ptr self, const std::shared_ptr<staging>& g, size_t i, int32_t from) {
  auto& p = self->state.parts[i];
  msg::weight_source source = p.source;
  source.copy_from = from;
  if (auto it = g->after.find(i); it != g->after.end())
    for (size_t d : it->second) source.copy_to.push_back(self->state.parts[d].worker);
  self->request(p.handle, phase_timeout, msg::stage_atom::value, source, self->state.req.mode)
      .then(
          [self, g, i](msg::module_report& r) {
            const bool copyable = r.path == msg::write_path::staged;
            g->in.replies.emplace(i, std::move(r));
            stage_answered(self, g, i, copyable ? self->state.parts[i].worker : -1);
          },
          [self, g, i](caf::error& e) {
            g->in.errors.emplace(i, std::move(e));
            stage_answered(self, g, i, -1);
          });
}

// Every participant stages. Read once per host: a participant whose worker copies from another worker of its process
// stages after that worker's participant of the same module did, copying its staged values (over NVLink between GPUs)
// instead of reading the files again; it reads them when that one did not stage a copy (failed, or in place).
void stage(self_ptr self) {
  auto& st = self->state;
  auto g = std::make_shared<staging>();
  g->left = st.parts.size();
  std::vector<size_t> first;
  for (size_t i = 0; i < st.parts.size(); ++i) {
    const int32_t from = copies_from(st, st.parts[i]);
    size_t reader = st.parts.size();
    for (size_t r = 0; r < st.parts.size() && from >= 0; ++r)
      if (st.parts[r].worker == from && st.parts[r].module == st.parts[i].module) reader = r;
    if (reader < st.parts.size()) g->after[reader].push_back(i);
    else first.push_back(i);
  }
  if (st.parts.empty()) return staged(self, g->in);
  for (size_t i : first) stage_one(self, g, i, -1);
}

void staged(self_ptr self, fan_in<msg::module_report>& in) {
  auto& st = self->state;
  std::set<msg::write_path> paths;
  for (auto& [i, r] : in.replies) {
    auto& p = st.parts[i];
    p.at = phase::staged;
    p.stage_report = r;
    paths.insert(r.path);
    spdlog::info("update: {} staged ({}): {:.1f} MB in {:.3f} s ({:.2f} GB/s) from {}", who(p), msg::to_string(r.path),
                 r.bytes / 1e6, r.seconds, r.seconds > 0 ? r.bytes / r.seconds / 1e9 : 0.0, r.source);
  }
  if (auto failure = first_failure(self, in, "stage"); !failure.empty()) return abort(self, failure);
  st.result.mode = paths.size() == 1 ? *paths.begin() : msg::write_path::mixed;
  st.result.mode_reason = mode_reason(st.req.mode, st.result.mode);
  record_phase(self, "stage");
  pause(self);
}

// ---------------------------------------------------------------------------------------------
// pause, commit: nothing generates

void pause(self_ptr self) {
  auto& st = self->state;
  if (!st.ctx.preplanned.empty()) return commit(self);  // a catch-up: its worker serves nothing yet
  st.pause_start = clock::now();
  st.paused = true;  // from the request on: the scheduler holds generation back even when its answer is lost
  self->request(st.ctx.scheduler, phase_timeout, msg::pause_atom::value, st.req.abort_all_requests)
      .then(
          [self](uint64_t cancelled) {
            auto& st = self->state;
            st.result.aborted_requests = cancelled;
            st.result.timings["drain"] = since(st.pause_start);
            // From here on nothing generates: the pause that clients see lasts until resume.
            st.pause_start = st.phase_start = clock::now();
            commit(self);
          },
          [self](caf::error& e) { abort(self, "Could not pause generation: " + msg::describe(e)); });
}

void commit(self_ptr self) {
  ask_parts(self, in_phase(self->state, phase::staged),
            [self](participant& p) { return self->request(p.handle, phase_timeout, msg::commit_atom::value); },
            [self](fan_in<msg::module_report>& in) {
              auto& st = self->state;
              for (auto& [i, r] : in.replies) {
                auto& p = st.parts[i];
                p.at = phase::committed;
                // A module's work is its staging read plus its commit (a swap, or the in-place read).
                msg::module_report total = r;
                total.worker = p.worker;  // a joined worker numbers itself in its own process
                total.seconds += p.stage_report.seconds;
                total.bytes = std::max(total.bytes, p.stage_report.bytes);
                st.result.modules.push_back(total);
                spdlog::info("update: {} committed ({}, {} tensors, {:.1f} MB, {:.3f} s) from {}", who(p), msg::to_string(r.path), r.tensors,
                             r.bytes / 1e6, r.seconds, r.source);
              }
              st.failure = first_failure(self, in, "commit");
              if (st.failure.empty()) return decided(self);
              st.result.modules.clear();
              compensate(self, in);
            });
}

// ---------------------------------------------------------------------------------------------
// decided: every commit succeeded

// Each worker records the decision first, so a module actor that dies from here on is replaced by one
// that keeps the new weights; then the caches are flushed and every participant finalizes.
void decided(self_ptr self) {
  record_phase(self, "commit");
  self->state.result.success = true;
  decide(self, indices(self->state.parts.size()), [self] {
    auto& st = self->state;
    auto finish = [self] {
      conclude(self, {}, indices(self->state.parts.size()), 0, [self] {
        self->state.result.message = describe_committed(self->state);
        record_phase(self, "finish");
        resume_and_reply(self, true);
      });
    };
    for (const auto& p : st.parts) st.result.applied[p.module] = p.source;
    if (!st.req.flush_cache || st.ctx.caches.empty()) return finish();
    fan_out<uint64_t>(
        st.ctx.members,
        [self](size_t c) { return self->request(self->state.ctx.caches[c], phase_timeout, msg::reset_atom::value); },
        [self, finish](fan_in<uint64_t>& in) {
          self->state.result.cache_flushed = !in.replies.empty();
          finish();
        });
  });
}

// ---------------------------------------------------------------------------------------------
// The update stops: before any commit (abort), or after a commit failed (compensate)

// Frees shadows and leaves every live weight as it was. Every participant is settled before the reply
// (an actor that died is replaced first), so a client that asks right after the reply never reaches a
// dead actor.
void abort(self_ptr self, const std::string& why) {
  auto& st = self->state;
  st.result.success = false;
  st.result.message = stopped_before_commit(why);
  // The staged free their shadows; those that failed their stage clean up whatever it left (discard is
  // idempotent).
  std::vector<size_t> clean = in_phase(st, phase::staged), failed = in_phase(st, phase::failed);
  clean.insert(clean.end(), failed.begin(), failed.end());
  ask_parts(self, clean,
            [self](participant& p) { return self->request(p.handle, phase_timeout, msg::discard_atom::value); },
            [self](fan_in<msg::module_report>&) {
              settle(self, indices(self->state.parts.size()), [self](settled s) {
                self->state.result.message += settled_sentences(self->state, s);
                resume_and_reply(self, false);  // replies at once when generation was never paused
              });
            });
}

// A participant failed during commit: settle the failed ones (a dead one is replaced, and the
// replacement undoes its commit), roll back every other participant (committed ones undo their commit;
// failed ones that live restore whatever they half did), settle every one whose rollback failed, then
// resume generation and reply.
void compensate(self_ptr self, fan_in<msg::module_report>& commit_replies) {
  self->state.result.success = false;
  std::vector<size_t> failed;
  for (auto& [i, e] : commit_replies.errors) failed.push_back(i);
  settle(self, failed, [self](settled first) {
    auto& st = self->state;
    std::vector<size_t> undo;
    for (size_t i = 0; i < st.parts.size(); ++i)
      if (!first.replaced.count(i) && !first.unrecovered.count(i)) undo.push_back(i);
    ask_parts(self, undo, [self](participant& p) { return self->request(p.handle, phase_timeout, msg::rollback_atom::value); },
              [self, undo, first](fan_in<msg::module_report>& rolled) {
                auto& st = self->state;
                std::vector<size_t> unsure;  // the rollback did not answer success
                for (size_t i : undo) {
                  if (!rolled.ok(i)) unsure.push_back(i);
                  else if (st.parts[i].at == phase::committed) {
                    st.result.modules.push_back(rolled.replies.at(i));
                    st.result.modules.back().worker = st.parts[i].worker;
                  }
                }
                std::map<size_t, std::string> errors;
                for (auto& [i, e] : rolled.errors) errors[i] = msg::describe(e);
                settle(self, unsure, [self, undo, first, errors](settled second) {
                  auto& st = self->state;
                  rollback_outcome o;
                  o.lost = first;  // replaced or unreachable before their rollback: they held no commit
                  for (size_t i : undo) {
                    const bool committed = st.parts[i].at == phase::committed;
                    if (second.replaced.count(i)) {
                      if (committed) o.rolled_back.push_back({i, true});
                      else o.lost.replaced.insert(i);
                    } else if (second.unrecovered.count(i)) {
                      if (committed) o.rollback_failed.emplace_back(i, errors.at(i) + " (" + second.unrecovered.at(i) + ")");
                      else o.lost.unrecovered[i] = second.unrecovered.at(i);
                    } else if (errors.count(i)) {
                      o.rollback_failed.emplace_back(i, errors.at(i));
                    } else if (committed) {
                      o.rolled_back.push_back({i, false});
                    }
                  }
                  st.result.message = describe(st, o);
                  record_phase(self, "rollback");
                  resume_and_reply(self, false);
                });
              });
  });
}

// ---------------------------------------------------------------------------------------------
// resume, reply

// Generation resumes on the new weights (and the served weight_version advances) once the update is
// decided, i.e. every commit succeeded, even when a participant failed after that.
void resume_and_reply(self_ptr self, bool decided) {
  auto& st = self->state;
  if (!st.paused) return reply(self);
  self->request(st.ctx.scheduler, phase_timeout, msg::resume_atom::value, decided)
      .then(
          [self](std::string& version) {
            auto& st = self->state;
            st.paused = false;
            st.result.weight_version = version;
            st.result.timings["pause"] = since(st.pause_start);
            reply(self);
          },
          [self](caf::error& e) {
            self->state.result.message += " (resuming generation failed: " + msg::describe(e) + ")";
            reply(self);
          });
}

void reply(self_ptr self) {
  auto& st = self->state;
  if (st.received) {
    // What the workers received goes before the reply (what the modules adopted lives on as weights), so
    // the memory is back when the client hears the outcome.
    st.received = false;
    fan_out<bool>(
        st.ctx.members,
        [self](size_t w) {
          auto& st = self->state;
          return self->request(st.ctx.transfers[w], phase_timeout, msg::release_atom::value, st.ctx.update, st.req.empty_cache);
        },
        [self](fan_in<bool>& in) {
          for (auto& [w, e] : in.errors)
            spdlog::warn("update: worker {} did not release what it received: {}", w, msg::describe(e));
          record_phase(self, "release");
          reply(self);
        });
    return;
  }
  st.result.timings["total"] = since(st.start);
  if (st.result.success)
    spdlog::info("update {}: committed {} module(s) in {:.3f} s (pause {:.3f} s)", source_label(st.req), st.parts.size(),
                 st.result.timings["total"], st.result.timings.count("pause") ? st.result.timings["pause"] : 0.0);
  else
    spdlog::warn("update {}: failed: {}", source_label(st.req), st.result.message);
  st.promise.deliver(st.result);
  self->quit();
}

}  // namespace
}  // namespace txn

msg::transaction_actor spawn_update_transaction(caf::actor_system& sys, transaction_context context) {
  return sys.spawn([context](txn::self_ptr self) -> msg::transaction_actor::behavior_type {
    self->state.ctx = context;
    self->set_down_handler([self](caf::down_msg& dm) {
      for (auto& p : self->state.parts)
        if (p.handle.address() == dm.source)
          spdlog::warn("update: {} went down during the update ({})", txn::who(p), caf::to_string(dm.reason));
    });
    return {
        [self](msg::update_atom, const msg::update_request& req) -> caf::result<msg::update_result> {
          self->state.promise = self->make_response_promise<msg::update_result>();
          txn::start(self, req);
          return self->state.promise;
        },
    };
  });
}

}  // namespace refit::actors
