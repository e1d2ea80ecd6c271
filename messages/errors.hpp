// Errors are values: caf::error of category "refit", with a message naming module, phase and cause.
#pragma once

#include <caf/error.hpp>

#include <cstdint>
#include <string>

namespace refit::msg {

enum class refit_errc : uint8_t {
  invalid_request = 1,  // malformed or unsupported request fields
  module_not_found,     // a target module the pipeline does not have
  checkpoint_invalid,   // plan/validate: the checkpoint cannot provide the weights
  phase_failed,         // a participant failed a phase (its reply or its death)
  cancelled,            // generation aborted by an update with abort_all_requests
  generation_failed,
  fault_injection_unavailable,
  transfer_failed,      // receiving from a trainer failed (the group was left)
  sleeping,             // the server released its device memory (release_memory_occupation)
  worker_lost,          // the connection to a worker on another host was lost (its requests fail with this)
};
std::string to_string(refit_errc code);
caf::error make_error(refit_errc code, std::string message);
// The text of a refit error (or CAF's rendering of any other).
std::string describe(const caf::error& err);
// Whether `err` is the refit error `code`.
bool is(const caf::error& err, refit_errc code);

}  // namespace refit::msg
