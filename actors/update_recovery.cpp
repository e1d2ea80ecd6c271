// The update transaction's recovery: settling participants whose actors may have died, recording the
// decision with the workers, and, after the decision, bringing every participant to the new weights
// (finalize; an actor replaced since is given the update again unless it kept it). The rule a
// replacement follows on start (keep a decided commit, undo an undecided one) is the update core's:
// update::module_updater::on_actor_start.
#include <spdlog/spdlog.h>

#include "actors/fan_out.hpp"
#include "actors/update_state.hpp"

namespace refit::actors::txn {

namespace {

constexpr int conclude_rounds = 3;

// After the decision: a participant that fails from here on is not rolled back (the others keep the
// new weights); it is named in the reply.
void fail_after_decision(self_ptr self, size_t i, const std::string& what) {
  auto& st = self->state;
  st.result.success = false;
  st.failure += (st.failure.empty() ? "" : "; ") + who(st.parts[i]) + " " + what;
}

// Which replacements kept their predecessor's decided commit (module_info.kept_decided); the others
// restored the old weights on start.
void find_kept(self_ptr self, const std::vector<size_t>& replaced, std::function<void(std::set<size_t>)> next) {
  fan_out<msg::module_info>(
      replaced, [self](size_t i) { return self->request(self->state.parts[i].handle, phase_timeout, msg::info_atom::value); },
      [next](fan_in<msg::module_info>& in) {
        std::set<size_t> kept;
        for (auto& [i, info] : in.replies)
          if (info.kept_decided) kept.insert(i);
        next(kept);
      });
}


// Stages and commits again on replacements whose start-up undid the commit of their dead predecessor,
// and records the decision for them. `next` gets those that committed and those that failed (a failed
// one that lives has discarded).
void recommit(self_ptr self, const std::vector<size_t>& which, std::function<void(std::vector<size_t>, std::vector<size_t>)> next) {
  ask_parts(self, which,
            [self](participant& p) {
              // The path it took the first time: staged again if it was staged, else in place.
              const auto mode = p.stage_report.path == msg::write_path::staged ? msg::update_mode::staged : msg::update_mode::in_place;
              return self->request(p.handle, phase_timeout, msg::stage_atom::value, p.source, mode);
            },
            [self, which, next](fan_in<msg::module_report>& staged) {
              std::vector<size_t> ready, failed;
              for (size_t i : which) (staged.ok(i) ? ready : failed).push_back(i);
              ask_parts(self, ready, [self](participant& p) { return self->request(p.handle, phase_timeout, msg::commit_atom::value); },
                        [self, ready, failed, next](fan_in<msg::module_report>& committed) mutable {
                          std::vector<size_t> done;
                          for (size_t i : ready) {
                            if (!committed.ok(i)) {
                              failed.push_back(i);
                              continue;
                            }
                            self->state.parts[i].fate = participant::after_decision::reapplied;
                            spdlog::warn("update: {} died before it finalized; its replacement applied the update again", who(self->state.parts[i]));
                            done.push_back(i);
                          }
                          ask_parts(self, failed, [self](participant& p) { return self->request(p.handle, phase_timeout, msg::discard_atom::value); },
                                    [self, done, failed, next](fan_in<msg::module_report>&) {
                                      decide(self, done, [done, failed, next] { next(done, failed); });
                                    });
                        });
            });
}

}  // namespace

void settle(self_ptr self, const std::vector<size_t>& which, std::function<void(settled)> next) {
  fan_out<msg::module_actor>(
      which,
      [self](size_t i) {
        const auto& p = self->state.parts[i];
        return self->request(self->state.ctx.workers[p.worker], phase_timeout, msg::recover_atom::value, p.module);
      },
      [self, next](fan_in<msg::module_actor>& in) {
        settled out;
        for (auto& [i, actor] : in.replies) {
          auto& p = self->state.parts[i];
          if (actor == p.handle) continue;
          p.handle = actor;
          self->monitor(actor);
          out.replaced.insert(i);
        }
        for (auto& [i, e] : in.errors) out.unrecovered[i] = msg::describe(e);
        next(std::move(out));
      });
}

void decide(self_ptr self, const std::vector<size_t>& which, std::function<void()> next) {
  fan_out<bool>(
      which,
      [self](size_t i) {
        const auto& p = self->state.parts[i];
        return self->request(self->state.ctx.workers[p.worker], phase_timeout, msg::decide_atom::value, p.module);
      },
      [next](fan_in<bool>& in) {
        // Not recorded: a replacement would undo this commit, and conclude would redo it.
        for (auto& [i, e] : in.errors) spdlog::warn("update: a worker did not record the decision: {}", msg::describe(e));
        next();
      });
}

// Finalizing drops each participant's undo record. One that does not finalize is settled: one that
// lives is asked again; a replacement that kept the decided commit is done; one whose start-up undid it
// (the decision was not recorded in time) is staged and committed again (`redo`), still inside the
// pause, instead of being left on the old weights. At most conclude_rounds rounds.
void conclude(self_ptr self, std::vector<size_t> redo, std::vector<size_t> fin, int round, std::function<void()> done) {
  if (redo.empty() && fin.empty()) return done();
  if (round == conclude_rounds) {
    for (size_t i : redo) fail_after_decision(self, i, "could not be given the new weights again after its actor died");
    for (size_t i : fin) fail_after_decision(self, i, "did not finalize (it holds the new weights and keeps its undo record)");
    return done();
  }
  recommit(self, redo, [self, fin, round, done](std::vector<size_t> recommitted, std::vector<size_t> failed_redo) mutable {
    fin.insert(fin.end(), recommitted.begin(), recommitted.end());
    ask_parts(self, fin, [self](participant& p) { return self->request(p.handle, phase_timeout, msg::finalize_atom::value); },
              [self, fin, failed_redo, round, done](fan_in<msg::module_report>& finalized) {
                std::vector<size_t> failed = failed_redo;
                for (size_t i : fin)
                  if (!finalized.ok(i)) failed.push_back(i);
                const std::set<size_t> redo_failed(failed_redo.begin(), failed_redo.end());
                settle(self, failed, [self, failed, redo_failed, round, done](settled s) {
                  find_kept(self, std::vector<size_t>(s.replaced.begin(), s.replaced.end()),
                            [self, failed, redo_failed, round, done, s](std::set<size_t> kept) {
                              std::vector<size_t> next_redo, next_fin;
                              for (size_t i : failed) {
                                if (s.unrecovered.count(i)) fail_after_decision(self, i, "could not be recovered: " + s.unrecovered.at(i));
                                else if (kept.count(i)) {
                                  // Finalized by its replacement; a participant given the update again keeps saying so.
                                  auto& fate = self->state.parts[i].fate;
                                  if (fate != participant::after_decision::reapplied) fate = participant::after_decision::kept;
                                }
                                else if (s.replaced.count(i) || redo_failed.count(i)) next_redo.push_back(i);
                                else next_fin.push_back(i);
                              }
                              conclude(self, next_redo, next_fin, round + 1, done);
                            });
                });
              });
  });
}

}  // namespace refit::actors::txn
