#include "actors/update_transaction.hpp"

#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <set>

#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::actors {

using msg::refit_errc;
using clock = std::chrono::steady_clock;

namespace {

// Reading a large cold checkpoint can take minutes; this only guards against a participant that
// neither answers nor dies.
constexpr auto phase_timeout = std::chrono::seconds(1800);

double since(clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); }

struct participant {
  int32_t worker = 0;
  std::string module;
  std::string dir;
  msg::module_actor handle;
  bool staged = false;
  bool committed = false;
  std::string path;
  msg::module_report stage_report;  // reading into shadows happens here; commit may be only a swap
  bool reapplied = false;           // its actor died after the decision; the replacement got the update again
  bool kept = false;                // its actor died after the decision; the replacement kept the new weights
};

// Collects one reply (or error) per participant of a phase, then runs `done` once.
struct gather {
  size_t pending = 0;
  std::vector<bool> ok;
  std::vector<std::string> errors;
  std::vector<msg::module_report> reports;
  std::function<void()> done;
  void one() {
    if (--pending == 0) done();
  }
};

struct txn_state {
  transaction_context ctx;
  msg::update_request req;
  caf::typed_response_promise<msg::update_result> promise;
  std::vector<participant> parts;
  msg::update_result result;
  clock::time_point start, phase_start, pause_start;
  bool paused = false;
  std::string failure;  // the first participant failure, worded for the user
  static inline const char* name = "refit.update_transaction";
};

using self_ptr = transaction_actor::stateful_pointer<txn_state>;

std::string who(const participant& p) { return "module '" + p.module + "' (worker " + std::to_string(p.worker) + ")"; }

// Sends one request per selected participant; `make` issues it and returns the pending request.
template <class Make>
void fan_out(self_ptr self, const std::vector<size_t>& which, Make make, std::function<void(std::shared_ptr<gather>)> done) {
  auto g = std::make_shared<gather>();
  const size_t n = self->state.parts.size();
  g->ok.assign(n, false);
  g->errors.assign(n, "");
  g->reports.assign(n, {});
  g->pending = which.size();
  g->done = [weak = std::weak_ptr<gather>(g), done] { done(weak.lock()); };  // the pending requests own g
  if (which.empty()) {
    done(g);
    return;
  }
  for (size_t i : which)
    make(self->state.parts[i]).then(
        [g, i](msg::module_report& r) {
          g->ok[i] = true;
          g->reports[i] = std::move(r);
          g->one();
        },
        [g, i](caf::error& e) {
          g->errors[i] = msg::describe(e);
          g->one();
        });
}

std::vector<size_t> all(self_ptr self) {
  std::vector<size_t> v(self->state.parts.size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = i;
  return v;
}

void record_phase(self_ptr self, const char* phase) {
  self->state.result.timings[phase] = since(self->state.phase_start);
  self->state.phase_start = clock::now();
}

void reply(self_ptr self) {
  auto& st = self->state;
  st.result.timings["total"] = since(st.start);
  if (st.result.success)
    spdlog::info("update {}: committed {} module(s) in {:.3f} s (pause {:.3f} s)", st.req.model_path, st.parts.size(),
                 st.result.timings["total"], st.result.timings.count("pause") ? st.result.timings["pause"] : 0.0);
  else
    spdlog::warn("update {}: failed: {}", st.req.model_path, st.result.message);
  st.promise.deliver(st.result);
  self->quit();
}

// Issues one request per index in `which` (`make(i)` sends it); `on_reply(i, reply)` or `on_error(i, error)`
// sees each answer, and `done` runs once after the last.
template <class Reply, class Make>
void ask_each(const std::vector<size_t>& which, Make make, std::function<void(size_t, Reply&)> on_reply,
              std::function<void(size_t, caf::error&)> on_error, std::function<void()> done) {
  if (which.empty()) return done();
  auto pending = std::make_shared<size_t>(which.size());
  for (size_t i : which)
    make(i).then(
        [i, pending, on_reply, done](Reply& r) {
          on_reply(i, r);
          if (--*pending == 0) done();
        },
        [i, pending, on_error, done](caf::error& e) {
          on_error(i, e);
          if (--*pending == 0) done();
        });
}

// What settling a set of participants found: who was replaced, and who could not be settled (the
// worker did not answer, or the actor is alive but does not answer) with why.
struct settled {
  std::set<size_t> replaced;
  std::map<size_t, std::string> unrecovered;
};

// Settles participants: each one's worker answers with the module's actor once it is settled
// (recover_atom) — the same actor if it is alive, else a replacement whose start-up has already undone
// its predecessor's unfinished commit.
void settle(self_ptr self, const std::vector<size_t>& which, std::function<void(settled)> next) {
  auto out = std::make_shared<settled>();
  ask_each<msg::module_actor>(
      which,
      [self](size_t i) {
        const auto& p = self->state.parts[i];
        return self->request(self->state.ctx.workers[p.worker], phase_timeout, msg::recover_atom::value, p.module);
      },
      [self, out](size_t i, msg::module_actor& actor) {
        auto& p = self->state.parts[i];
        if (actor != p.handle) {
          p.handle = actor;
          self->monitor(actor);
          p.committed = false;  // the replacement restored the module on start, or finalized a decided commit
          out->replaced.insert(i);
        }
      },
      [out](size_t i, caf::error& e) { out->unrecovered[i] = msg::describe(e); }, [out, next] { next(*out); });
}

void say_settled(self_ptr self, const settled& s) {
  auto& st = self->state;
  for (size_t i : s.replaced) st.result.message += " The actor of " + who(st.parts[i]) + " died and was replaced.";
  for (const auto& [i, why] : s.unrecovered) st.result.message += " The actor of " + who(st.parts[i]) + " could not be recovered: " + why + ".";
}

// Generation resumes on the new weights (and the served weight_version advances) once the update is
// decided, i.e. every commit succeeded, even when a participant failed after that.
void resume_and_reply(self_ptr self, bool decided) {
  auto& st = self->state;
  if (!st.paused) {
    reply(self);
    return;
  }
  self->request(st.ctx.scheduler, phase_timeout, msg::resume_atom::value, decided).then(
      [self](std::string& version) {
        self->state.paused = false;
        self->state.result.weight_version = version;
        self->state.result.timings["pause"] = since(self->state.pause_start);
        reply(self);
      },
      [self](caf::error& e) {
        self->state.result.message += " (resuming generation failed: " + msg::describe(e) + ")";
        reply(self);
      });
}

// Ends the update before anything was committed: frees shadows, leaves every live weight as it was.
// Every participant is settled before the reply (an actor that died is replaced first), so a client
// that asks right after the reply never reaches a dead actor.
void fail_before_commit(self_ptr self, const std::string& why) {
  auto& st = self->state;
  st.result.success = false;
  st.result.message = why + ". No weights were changed (the update stopped before commit).";
  std::vector<size_t> staged;
  for (size_t i = 0; i < st.parts.size(); ++i)
    if (st.parts[i].staged) staged.push_back(i);
  fan_out(self, staged, [self](participant& p) { return self->request(p.handle, phase_timeout, msg::discard_atom::value); },
          [self](std::shared_ptr<gather>) {
            settle(self, all(self), [self](settled s) {
              say_settled(self, s);
              resume_and_reply(self, false);  // replies at once when generation was never paused
            });
          });
}

std::string first_failure(self_ptr self, const gather& g, const char* phase) {
  for (size_t i = 0; i < self->state.parts.size(); ++i) {
    if (g.ok[i]) continue;
    const auto& p = self->state.parts[i];
    // Module actors name themselves and the phase in their errors; say it once.
    std::string cause = g.errors[i];
    const std::string own = who(p) + " phase '" + phase + "': ";
    if (cause.rfind(own, 0) == 0) cause.erase(0, own.size());
    return "Failed to update " + who(p) + " in phase '" + phase + "': " + cause;
  }
  return {};
}

// A participant failed during commit: settle the failed ones (a dead one is replaced, and the
// replacement undoes its commit), roll back every other participant (committed ones undo their commit;
// failed ones that live restore whatever they half did), settle every one whose rollback failed, then
// resume generation and reply.
void compensate(self_ptr self, std::shared_ptr<gather> commit) {
  auto& st = self->state;
  st.result.success = false;
  std::vector<size_t> failed_commit;
  for (size_t i = 0; i < st.parts.size(); ++i) {
    if (commit->ok[i]) st.parts[i].committed = true;
    else failed_commit.push_back(i);
  }
  settle(self, failed_commit, [self](settled first) {
    std::vector<size_t> undo;
    for (size_t i = 0; i < self->state.parts.size(); ++i)
      if (!first.replaced.count(i) && !first.unrecovered.count(i)) undo.push_back(i);
    fan_out(self, undo, [self](participant& p) { return self->request(p.handle, phase_timeout, msg::rollback_atom::value); },
            [self, undo, first](std::shared_ptr<gather> g) {
              auto& st = self->state;
              std::vector<size_t> unsure;  // the rollback did not answer success
              for (size_t i : undo) {
                if (g->ok[i]) {
                  if (st.parts[i].committed) st.result.modules.push_back(g->reports[i]);
                } else {
                  unsure.push_back(i);
                }
              }
              // Whether each was committed, before settling clears it for replaced ones.
              std::set<size_t> was_committed;
              for (size_t i : undo)
                if (st.parts[i].committed) was_committed.insert(i);
              settle(self, unsure, [self, undo, g, first, was_committed](settled second) {
                auto& st = self->state;
                std::string rolled, failed;
                settled lost = first;  // replaced or unreachable, not otherwise named below
                for (size_t i : undo) {
                  auto& p = st.parts[i];
                  const std::string where = p.module + " (worker " + std::to_string(p.worker);
                  const bool committed = was_committed.count(i) > 0;
                  if (second.replaced.count(i) && committed) rolled += (rolled.empty() ? "" : ", ") + where + ", by a replacement actor)";
                  else if (second.replaced.count(i)) lost.replaced.insert(i);
                  else if (second.unrecovered.count(i) && committed)
                    failed += (failed.empty() ? "" : "; ") + who(p) + ": " + g->errors[i] + " (" + second.unrecovered.at(i) + ")";
                  else if (second.unrecovered.count(i)) lost.unrecovered[i] = second.unrecovered.at(i);
                  else if (!g->ok[i]) failed += (failed.empty() ? "" : "; ") + who(p) + ": " + g->errors[i];
                  else if (committed) rolled += (rolled.empty() ? "" : ", ") + where + ")";
                }
                st.result.message = st.failure + ". ";
                if (!rolled.empty()) st.result.message += "Rolled back " + rolled + ". ";
                if (failed.empty())
                  st.result.message += "No weights were changed: every module holds the weights it had before the update.";
                else
                  st.result.message += "ROLLBACK FAILED for " + failed + ".";
                say_settled(self, lost);
                record_phase(self, "rollback");
                resume_and_reply(self, false);
              });
            });
  });
}

// After the decision: a participant that fails from here on is not rolled back (the others keep the new
// weights); it is brought to the new weights too, or named in the reply.
void fail_after_decision(self_ptr self, size_t i, const std::string& what) {
  auto& st = self->state;
  st.result.success = false;
  st.failure += (st.failure.empty() ? "" : "; ") + who(st.parts[i]) + " " + what;
}

// The reply of a decided update, after every participant finalized (or was updated again).
void report_committed(self_ptr self) {
  auto& st = self->state;
  std::set<std::string> modules;
  for (auto& p : st.parts) modules.insert(p.module);
  std::string names;
  for (auto& m : modules) names += (names.empty() ? "" : ", ") + m;
  if (st.result.success) {
    st.result.message = "Updated " + names + " from " + st.req.model_path + " on " + std::to_string(st.ctx.workers.size()) + " worker(s) (" +
                        st.result.mode + ")";
    for (size_t i = 0; i < st.parts.size(); ++i) {
      if (st.parts[i].reapplied)
        st.result.message += ". The actor of " + who(st.parts[i]) + " died after its commit and was replaced; the update was applied to it again";
      else if (st.parts[i].kept)
        st.result.message += ". The actor of " + who(st.parts[i]) + " died after the update was decided; its replacement kept the new weights";
    }
  } else {
    st.result.message = "Update committed, but " + st.failure + ". THE PIPELINE IS MIXED: every other module holds the new weights.";
  }
  record_phase(self, "finish");
  resume_and_reply(self, true);
}

// Records with the workers that the participants' latest commits are decided (decide_atom), so a
// replacement of an actor that dies from here on keeps the new weights; then `next`.
void decide(self_ptr self, const std::vector<size_t>& which, std::function<void()> next) {
  ask_each<bool>(
      which,
      [self](size_t i) {
        const auto& p = self->state.parts[i];
        return self->request(self->state.ctx.workers[p.worker], phase_timeout, msg::decide_atom::value, p.module);
      },
      [](size_t, bool&) {},
      [](size_t, caf::error& e) {
        // Not recorded: a replacement would undo this commit, and conclude would redo it.
        spdlog::warn("update: a worker did not record the decision: {}", msg::describe(e));
      },
      std::move(next));
}

// Which replacements kept their predecessor's decided commit (module_info.kept_decided); `next` gets
// them. The others restored the old weights on start.
void find_kept(self_ptr self, const std::vector<size_t>& replaced, std::function<void(std::set<size_t>)> next) {
  auto kept = std::make_shared<std::set<size_t>>();
  ask_each<msg::module_info>(
      replaced, [self](size_t i) { return self->request(self->state.parts[i].handle, phase_timeout, msg::info_atom::value); },
      [kept](size_t i, msg::module_info& info) {
        if (info.kept_decided) kept->insert(i);
      },
      [](size_t, caf::error&) {}, [kept, next] { next(*kept); });
}

// Stages and commits again on replacements whose start-up undid the commit of their dead predecessor.
// `next` gets those that committed and those that failed (a failed one that lives has discarded).
void recommit(self_ptr self, const std::vector<size_t>& which, std::function<void(std::vector<size_t>, std::vector<size_t>)> next) {
  fan_out(self, which,
          [self](participant& p) { return self->request(p.handle, phase_timeout, msg::stage_atom::value, p.dir, p.path); },
          [self, which, next](std::shared_ptr<gather> staged) {
            std::vector<size_t> ready, failed;
            for (size_t i : which) (staged->ok[i] ? ready : failed).push_back(i);
            fan_out(self, ready, [self](participant& p) { return self->request(p.handle, phase_timeout, msg::commit_atom::value); },
                    [self, ready, failed, next](std::shared_ptr<gather> committed) mutable {
                      std::vector<size_t> done;
                      for (size_t i : ready) {
                        if (committed->ok[i]) {
                          self->state.parts[i].reapplied = true;
                          spdlog::warn("update: {} died before it finalized; its replacement applied the update again",
                                       who(self->state.parts[i]));
                          done.push_back(i);
                        } else {
                          failed.push_back(i);
                        }
                      }
                      fan_out(self, failed, [self](participant& p) { return self->request(p.handle, phase_timeout, msg::discard_atom::value); },
                              [self, done, failed, next](std::shared_ptr<gather>) {
                                decide(self, done, [done, failed, next] { next(done, failed); });
                              });
                    });
          });
}

constexpr int conclude_rounds = 3;

// Once every commit succeeded the update is decided. Finalizing drops each participant's undo record.
// One that does not finalize is settled: one that lives is asked again; a replacement that kept the
// decided commit is done; one whose start-up undid it (the decision was not recorded in time) is staged
// and committed again (`redo`), still inside the pause, instead of being left on the old weights. At most conclude_rounds rounds; whatever
// is left then is named in the reply.
void conclude(self_ptr self, std::vector<size_t> redo, std::vector<size_t> fin, int round) {
  if (redo.empty() && fin.empty()) return report_committed(self);
  if (round == conclude_rounds) {
    for (size_t i : redo) fail_after_decision(self, i, "could not be given the new weights again after its actor died");
    for (size_t i : fin) fail_after_decision(self, i, "did not finalize (it holds the new weights and keeps its undo record)");
    return report_committed(self);
  }
  recommit(self, redo, [self, fin, round](std::vector<size_t> recommitted, std::vector<size_t> failed_redo) mutable {
    fin.insert(fin.end(), recommitted.begin(), recommitted.end());
    fan_out(self, fin, [self](participant& p) { return self->request(p.handle, phase_timeout, msg::finalize_atom::value); },
            [self, fin, failed_redo, round](std::shared_ptr<gather> g) {
              std::vector<size_t> failed = failed_redo;
              for (size_t i : fin)
                if (!g->ok[i]) failed.push_back(i);
              const std::set<size_t> redo_failed(failed_redo.begin(), failed_redo.end());
              settle(self, failed, [self, failed, redo_failed, round](settled s) {
                find_kept(self, std::vector<size_t>(s.replaced.begin(), s.replaced.end()), [self, failed, redo_failed, round, s](std::set<size_t> kept) {
                  std::vector<size_t> next_redo, next_fin;
                  for (size_t i : failed) {
                    if (s.unrecovered.count(i)) fail_after_decision(self, i, "could not be recovered: " + s.unrecovered.at(i));
                    else if (kept.count(i)) self->state.parts[i].kept = true;  // finalized by its replacement
                    else if (s.replaced.count(i) || redo_failed.count(i)) next_redo.push_back(i);
                    else next_fin.push_back(i);
                  }
                  conclude(self, next_redo, next_fin, round + 1);
                });
              });
            });
  });
}

// Every commit succeeded: the update is decided. Each worker records that for its modules first, so a
// module actor that dies from here on is replaced by one that keeps the new weights; then the caches
// are flushed and every participant finalizes.
void finish(self_ptr self) {
  auto& st = self->state;
  record_phase(self, "commit");
  st.result.success = true;
  auto flush_and_conclude = [self] {
    auto& st = self->state;
    if (!st.req.flush_cache || st.ctx.caches.empty()) {
      st.result.cache_flushed = false;
      conclude(self, {}, all(self), 0);
      return;
    }
    std::vector<size_t> caches(st.ctx.caches.size());
    for (size_t i = 0; i < caches.size(); ++i) caches[i] = i;
    ask_each<uint64_t>(
        caches, [self](size_t i) { return self->request(self->state.ctx.caches[i], phase_timeout, msg::reset_atom::value); },
        [self](size_t, uint64_t&) { self->state.result.cache_flushed = true; }, [](size_t, caf::error&) {},
        [self] { conclude(self, {}, all(self), 0); });
  };
  decide(self, all(self), flush_and_conclude);
}

void commit(self_ptr self) {
  fan_out(self, all(self), [self](participant& p) { return self->request(p.handle, phase_timeout, msg::commit_atom::value); },
          [self](std::shared_ptr<gather> g) {
            auto& st = self->state;
            for (size_t i = 0; i < st.parts.size(); ++i) {
              if (!g->ok[i]) continue;
              st.parts[i].committed = true;
              // A module's work is its staging read plus its commit (a swap, or the in-place read).
              msg::module_report r = g->reports[i];
              r.seconds += st.parts[i].stage_report.seconds;
              r.bytes = std::max(r.bytes, st.parts[i].stage_report.bytes);
              st.result.modules.push_back(r);
              spdlog::info("update: {} committed ({}, {} tensors, {:.1f} MB, {:.3f} s) from {}", who(st.parts[i]), g->reports[i].path,
                           g->reports[i].tensors, g->reports[i].bytes / 1e6, g->reports[i].seconds, g->reports[i].source_dir);
            }
            std::string failure = first_failure(self, *g, "commit");
            if (failure.empty()) {
              finish(self);
              return;
            }
            st.failure = failure;
            st.result.modules.clear();
            compensate(self, g);
          });
}

void pause_and_commit(self_ptr self) {
  auto& st = self->state;
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
          [self](caf::error& e) { fail_before_commit(self, "Could not pause generation: " + msg::describe(e)); });
}

void stage(self_ptr self) {
  auto& st = self->state;
  const std::string path = st.req.mode == "in_place" ? "in_place" : st.req.mode == "staged" ? "staged" : "auto";
  fan_out(self, all(self),
          [self, path](participant& p) { return self->request(p.handle, phase_timeout, msg::stage_atom::value, p.dir, path); },
          [self](std::shared_ptr<gather> g) {
            auto& st = self->state;
            std::set<std::string> paths;
            for (size_t i = 0; i < st.parts.size(); ++i)
              if (g->ok[i]) {
                const auto& r = g->reports[i];
                st.parts[i].staged = true;
                st.parts[i].stage_report = r;
                st.parts[i].path = r.path;
                paths.insert(r.path);
                spdlog::info("update: {} staged ({}): {:.1f} MB in {:.3f} s ({:.2f} GB/s) from {}", who(st.parts[i]), r.path, r.bytes / 1e6,
                             r.seconds, r.seconds > 0 ? r.bytes / r.seconds / 1e9 : 0.0, r.source_dir);
              }
            std::string failure = first_failure(self, *g, "stage");
            if (!failure.empty()) {
              fail_before_commit(self, failure);
              return;
            }
            st.result.mode = paths.size() == 1 ? *paths.begin() : "mixed";
            if (st.req.mode != "auto") st.result.mode_reason = "mode '" + st.req.mode + "' was requested";
            else if (st.result.mode == "staged") st.result.mode_reason = "shadow buffers for the new weights fit in free memory";
            else st.result.mode_reason = "shadow buffers did not fit in free memory: copied in place after an undo snapshot";
            record_phase(self, "stage");
            pause_and_commit(self);
          });
}

void validate(self_ptr self) {
  fan_out(self, all(self), [self](participant& p) { return self->request(p.handle, phase_timeout, msg::validate_atom::value, p.dir); },
          [self](std::shared_ptr<gather> g) {
            std::string failure = first_failure(self, *g, "validate");
            if (!failure.empty()) {
              fail_before_commit(self, failure);
              return;
            }
            uint64_t bytes = 0;
            for (size_t i = 0; i < self->state.parts.size(); ++i) bytes += g->reports[i].bytes;
            spdlog::info("update {}: validated {} module(s), {:.1f} MB, from headers", self->state.req.model_path,
                         self->state.parts.size(), bytes / 1e6);
            record_phase(self, "validate");
            stage(self);
          });
}

// Plan: resolve the checkpoint and the target modules. Nothing is touched if this fails.
std::string plan(self_ptr self, std::map<std::string, std::string>& dirs) {
  auto& st = self->state;
  const auto& req = st.req;
  if (req.model_path.empty()) return "model_path is required";
  std::vector<std::string> targets = req.target_modules.empty() ? st.ctx.pipeline_modules : req.target_modules;
  for (const auto& t : targets)
    if (std::find(st.ctx.pipeline_modules.begin(), st.ctx.pipeline_modules.end(), t) == st.ctx.pipeline_modules.end())
      return "Module '" + t + "' not found in pipeline (modules: text_encoder, transformer, vae)";
  std::set<std::string> unique(targets.begin(), targets.end());
  try {
    const auto layout = weights::read_model_layout(req.model_path);
    for (const auto& t : unique) {
      const auto* c = layout.find(t);
      if (!c || !c->weight_bearing) return "Checkpoint " + layout.root.string() + " has no weights for module '" + t + "'";
      dirs[t] = c->dir.string();
    }
  } catch (const std::exception& e) {
    return std::string("Cannot use model_path: ") + e.what();
  }
  return {};
}

}  // namespace

transaction_actor spawn_update_transaction(caf::actor_system& sys, transaction_context context) {
  return sys.spawn([context](self_ptr self) -> transaction_actor::behavior_type {
    self->state.ctx = context;
    self->set_down_handler([self](caf::down_msg& dm) {
      for (auto& p : self->state.parts)
        if (p.handle.address() == dm.source) spdlog::warn("update: {} went down during the update ({})", who(p), caf::to_string(dm.reason));
    });
    return {
        [self](msg::update_atom, const msg::update_request& req) -> caf::result<msg::update_result> {
          auto& st = self->state;
          st.req = req;
          st.promise = self->make_response_promise<msg::update_result>();
          st.start = st.phase_start = clock::now();
          st.result.weight_version = req.weight_version;
          if (req.mode != "auto" && req.mode != "staged" && req.mode != "in_place") {
            st.result.message = "mode must be auto, staged or in_place, got '" + req.mode + "'";
            st.promise.deliver(st.result);
            self->quit();
            return st.promise;
          }
          std::map<std::string, std::string> dirs;
          if (auto why = plan(self, dirs); !why.empty()) {
            st.result.message = why + ". No weights were changed.";
            st.promise.deliver(st.result);
            self->quit();
            return st.promise;
          }
          record_phase(self, "plan");
          // Collect the module actors of every worker for the targets.
          auto pending = std::make_shared<size_t>(st.ctx.workers.size());
          auto errors = std::make_shared<std::string>();
          for (size_t w = 0; w < st.ctx.workers.size(); ++w) {
            self->request(st.ctx.workers[w], phase_timeout, msg::modules_atom::value)
                .then(
                    [self, w, dirs, pending, errors](std::map<std::string, msg::module_actor>& handles) {
                      for (const auto& [module, dir] : dirs) {
                        participant p;
                        p.worker = static_cast<int32_t>(w);
                        p.module = module;
                        p.dir = dir;
                        p.handle = handles.at(module);
                        self->monitor(p.handle);
                        self->state.parts.push_back(p);
                      }
                      if (--*pending == 0) {
                        if (errors->empty()) validate(self);
                        else fail_before_commit(self, *errors);
                      }
                    },
                    [self, w, pending, errors](caf::error& e) {
                      *errors = "Worker " + std::to_string(w) + " did not answer: " + msg::describe(e);
                      if (--*pending == 0) fail_before_commit(self, *errors);
                    });
          }
          return st.promise;
        },
    };
  });
}

}  // namespace refit::actors
