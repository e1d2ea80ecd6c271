// How an update ended, worded for the reply. The transaction computes what happened first (which
// participants were rolled back, by whom, which could not be); these functions only say it. Clients
// look for some of these words: "No weights were changed", "not found in pipeline", "ROLLBACK FAILED",
// "THE PIPELINE IS MIXED".
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "actors/update_state.hpp"

namespace refit::actors::txn {

// SGLang's sentence, which its clients look for ("rolled back"); said only where it is true.
inline constexpr const char* all_rolled_back = "All modules rolled back to original weights.";

// A participant's failure in a phase, said once: "Failed to update module 'M' (worker W) in phase 'P':
// cause" (module actors name themselves and the phase in their errors; that prefix is dropped).
std::string phase_failure(const participant& p, const char* phase, const std::string& error);

// An update that stopped before anything was committed.
std::string stopped_before_commit(const std::string& why);

// " The actor of module 'M' (worker W) died and was replaced." and " ... could not be recovered: why."
std::string settled_sentences(const state& st, const settled& s);

// The rollback after a failed commit.
struct rollback_outcome {
  struct undone {
    size_t part;
    bool by_replacement;  // its actor died while rolling back; the replacement undid the commit on start
  };
  std::vector<undone> rolled_back;                              // committed participants, now as before
  std::vector<std::pair<size_t, std::string>> rollback_failed;  // participants left on the new weights, and why
  settled lost;                                                 // actors replaced or unreachable that held no commit
};
std::string describe(const state& st, const rollback_outcome& outcome);

// A decided update: "Updated M1, M2 from PATH on N worker(s) (mode)", with what happened to replaced
// actors; or, when a participant could not be brought to the new weights, that the pipeline is mixed.
std::string describe_committed(const state& st);

// Why the update took the path it took.
std::string mode_reason(msg::update_mode requested, msg::write_path ran);

}  // namespace refit::actors::txn
