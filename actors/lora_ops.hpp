// SGLang's LoRA operations as update transactions: what the scheduler remembers between them (the
// adapters last set on each module, the version of the base weights while adapters are merged), and
// how a set / merge / unmerge request becomes an update request.
#pragma once

#include <map>
#include <string>
#include <variant>
#include <vector>

#include "messages/types.hpp"

namespace refit::lora {
class adapter_store;
}

namespace refit::actors {

class lora_registry {
 public:
  // The update that carries out `req` on `denoiser` (the module adapters target), or why it cannot run.
  std::variant<msg::update_request, std::string> plan(const msg::lora_request& req, const std::string& denoiser,
                                                      const lora::adapter_store& adapters) const;
  // The weight_version an update's commit serves (`given` when the request named one): a merge is the
  // base's version + "+lora:<nickname>@<strength>,...", an unmerge the base's version again, any other
  // update `fallback`.
  std::string version_after(const msg::update_request& committed, const std::string& served, const std::string& fallback);
  // Remembers what a committed update set, for a later merge_lora_weights (no target_modules: `denoiser`).
  void committed(const msg::update_request& req, const std::string& denoiser);

 private:
  std::map<std::string, std::vector<msg::lora_entry>> set_;  // module -> the adapters last set on it
  std::string base_version_;                                 // while merged: the base's version
};

// "Invalid target(s): ['<target>']. Valid targets: ['all', '<denoiser>']" (SGLang's wording).
std::string invalid_lora_target(const std::string& target, const std::string& denoiser);

}  // namespace refit::actors
