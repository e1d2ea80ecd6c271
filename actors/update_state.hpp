// Internal to the update transaction's files (update_transaction.cpp: the phases in order;
// update_recovery.cpp: settling, the decision and what follows it; update_outcome.cpp: the reply's
// wording): the transaction's state and its participants.
#pragma once

#include <caf/all.hpp>

#include <chrono>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "actors/fan_out.hpp"
#include "actors/update_transaction.hpp"

namespace refit::actors::txn {

using clock = std::chrono::steady_clock;

// Reading a large cold checkpoint can take minutes; this only guards against a participant that
// neither answers nor dies.
constexpr auto phase_timeout = std::chrono::seconds(1800);

// Where one participant stands; it only moves forward through the diagram.
enum class phase : uint8_t {
  joined,     // its actor is known
  validated,  // its source fits it
  staged,     // ready to commit (staged: shadows filled; in place: planned)
  committed,  // the new weights are live; it keeps the undo record
  failed,     // it failed the phase it was in
};

// One module on one worker.
struct participant {
  int32_t worker = 0;
  std::string module;
  msg::weight_source source;
  msg::module_actor handle;
  phase at = phase::joined;
  msg::module_report stage_report;  // reading into shadows happens at stage; commit may be only a swap
  // Past the decision its actor died: the replacement was given the update again, or kept it.
  enum class after_decision : uint8_t { as_planned, reapplied, kept } fate = after_decision::as_planned;
};

// What settling a set of participants found: who was replaced, and who could not be settled (the
// worker did not answer, or the actor is alive but does not answer) with why.
struct settled {
  std::set<size_t> replaced;
  std::map<size_t, std::string> unrecovered;
};

struct state {
  transaction_context ctx;
  msg::update_request req;
  caf::typed_response_promise<msg::update_result> promise;
  std::vector<participant> parts;
  msg::update_result result;
  clock::time_point start, phase_start, pause_start;
  bool paused = false;
  bool received = false;  // workers were asked to receive: they release before the reply
  std::string failure;  // the first participant failure (after the decision: each one), worded for the user
  static inline const char* name = "refit.update_transaction";
};

using self_ptr = msg::transaction_actor::stateful_pointer<state>;

double since(clock::time_point t);
void record_phase(self_ptr self, const char* phase);
std::string who(const participant& p);  // module 'M' (worker W)

// A fan-out of one module-actor request to participants; `make(p)` issues it.
template <class Make>
void ask_parts(self_ptr self, const std::vector<size_t>& which, Make make, std::function<void(fan_in<msg::module_report>&)> done) {
  fan_out<msg::module_report>(which, [self, make](size_t i) { return make(self->state.parts[i]); }, std::move(done));
}

// update_recovery.cpp
// Settles participants: each one's worker answers with the module's actor once it is settled
// (recover_atom): the same actor if it is alive, else a replacement whose start-up already undid its
// predecessor's unfinished commit (or kept a decided one).
void settle(self_ptr self, const std::vector<size_t>& which, std::function<void(settled)> next);
// Records with the workers that the participants' latest commits are decided, so a replacement of an
// actor that dies from here on keeps the new weights; then `next`.
void decide(self_ptr self, const std::vector<size_t>& which, std::function<void()> next);
// After the decision: finalizes `fin` and brings `redo` (replacements that undid the decided commit on
// start) to the new weights again, in bounded rounds; whatever is left is named in st.failure. `done`
// after the last round.
void conclude(self_ptr self, std::vector<size_t> redo, std::vector<size_t> fin, int round, std::function<void()> done);

}  // namespace refit::actors::txn
