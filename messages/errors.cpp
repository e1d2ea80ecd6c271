#include "messages/errors.hpp"

#include <caf/atom.hpp>
#include <caf/make_message.hpp>

#include "messages/protocol.hpp"

namespace refit::msg {

std::string to_string(refit_errc code) {
  switch (code) {
    case refit_errc::invalid_request: return "invalid_request";
    case refit_errc::module_not_found: return "module_not_found";
    case refit_errc::checkpoint_invalid: return "checkpoint_invalid";
    case refit_errc::phase_failed: return "phase_failed";
    case refit_errc::cancelled: return "cancelled";
    case refit_errc::sleeping: return "sleeping";
    case refit_errc::worker_lost: return "worker_lost";
    case refit_errc::generation_failed: return "generation_failed";
    case refit_errc::fault_injection_unavailable: return "fault_injection_unavailable";
    case refit_errc::transfer_failed: return "transfer_failed";
  }
  return "unknown";
}

caf::error make_error(refit_errc code, std::string message) {
  return caf::error(static_cast<uint8_t>(code), error_category, caf::make_message(std::move(message)));
}

std::string describe(const caf::error& err) {
  if (err.category() == error_category && err.context().match_elements<std::string>()) return err.context().get_as<std::string>(0);
  if (err.category() == error_category) return to_string(static_cast<refit_errc>(err.code()));
  return caf::to_string(err);
}

bool is(const caf::error& err, refit_errc code) { return err.category() == error_category && err.code() == static_cast<uint8_t>(code); }

}  // namespace refit::msg
