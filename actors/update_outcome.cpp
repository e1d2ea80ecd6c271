#include "actors/update_outcome.hpp"

#include <algorithm>

#include "actors/update_plan.hpp"

namespace refit::actors::txn {

std::string phase_failure(const participant& p, const char* phase, const std::string& error) {
  std::string cause = error;
  const std::string own = who(p) + " phase '" + phase + "': ";
  if (cause.rfind(own, 0) == 0) cause.erase(0, own.size());
  return "Failed to update " + who(p) + " in phase '" + phase + "': " + cause;
}

std::string stopped_before_commit(const std::string& why) {
  return why + ". No weights were changed (the update stopped before commit). " + all_rolled_back;
}

std::string settled_sentences(const state& st, const settled& s) {
  std::string out;
  for (size_t i : s.replaced) out += " The actor of " + who(st.parts[i]) + " died and was replaced.";
  for (const auto& [i, why] : s.unrecovered) out += " The actor of " + who(st.parts[i]) + " could not be recovered: " + why + ".";
  return out;
}

std::string describe(const state& st, const rollback_outcome& o) {
  std::string rolled, failed;
  for (const auto& u : o.rolled_back) {
    const participant& p = st.parts[u.part];
    rolled += (rolled.empty() ? "" : ", ") + p.module + " (worker " + std::to_string(p.worker) + (u.by_replacement ? ", by a replacement actor)" : ")");
  }
  for (const auto& [i, why] : o.rollback_failed) failed += (failed.empty() ? "" : "; ") + who(st.parts[i]) + ": " + why;
  std::string out = st.failure + ". ";
  if (!rolled.empty()) out += "Rolled back " + rolled + ". ";
  if (failed.empty()) out += "No weights were changed: every module holds the weights it had before the update. " + std::string(all_rolled_back);
  else out += "ROLLBACK FAILED for " + failed + ".";
  return out + settled_sentences(st, o.lost);
}

std::string describe_committed(const state& st) {
  if (!st.result.success)
    return "Update committed, but " + st.failure + ". THE PIPELINE IS MIXED: every other module holds the new weights.";
  std::vector<std::string> modules;
  for (const auto& p : st.parts)
    if (std::find(modules.begin(), modules.end(), p.module) == modules.end()) modules.push_back(p.module);
  std::sort(modules.begin(), modules.end());
  std::string names;
  for (const auto& m : modules) names += (names.empty() ? "" : ", ") + m;
  // SGLang's sentence for a distributed update comes first: its clients look for it.
  std::string out = st.req.source == msg::source_kind::distributed ? "Succeeded to update parameter online. " : "";
  out += "Updated " + names + " from " + source_label(st.req) + " on " + std::to_string(st.ctx.members.size()) + " worker(s) (" +
         msg::to_string(st.result.mode) + ")";
  for (const auto& p : st.parts) {
    if (p.fate == participant::after_decision::reapplied)
      out += ". The actor of " + who(p) + " died after its commit and was replaced; the update was applied to it again";
    else if (p.fate == participant::after_decision::kept)
      out += ". The actor of " + who(p) + " died after the update was decided; its replacement kept the new weights";
  }
  return out;
}

std::string mode_reason(msg::update_mode requested, msg::write_path ran) {
  if (requested != msg::update_mode::auto_select) return "mode '" + msg::to_string(requested) + "' was requested";
  if (ran == msg::write_path::staged) return "shadow buffers for the new weights fit in free memory";
  return "shadow buffers did not fit in free memory: copied in place after an undo snapshot";
}

}  // namespace refit::actors::txn
