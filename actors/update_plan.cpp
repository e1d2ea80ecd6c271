#include "actors/update_plan.hpp"

#include <algorithm>
#include <set>

#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::actors {

namespace {

update_plan plan_checkpoint(const msg::update_request& req, const std::set<std::string>& targets) {
  update_plan out;
  try {
    const auto layout = weights::read_model_layout(req.model_path);
    for (const auto& t : targets) {
      const auto* c = layout.find(t);
      if (!c || !c->weight_bearing) {
        out.error = "Checkpoint " + layout.root.string() + " has no weights for module '" + t + "'";
        return out;
      }
      out.sources[t] = {msg::source_kind::checkpoint, c->dir.string()};
    }
  } catch (const std::exception& e) {
    out.error = std::string("Cannot use model_path: ") + e.what();
  }
  return out;
}

}  // namespace

update_plan plan_update(const msg::update_request& req, const std::vector<std::string>& modules) {
  update_plan out;
  const std::vector<std::string>& targets = req.target_modules.empty() ? modules : req.target_modules;
  if (req.source == msg::source_kind::checkpoint && req.model_path.empty()) {
    out.error = "model_path is required";
    return out;
  }
  for (const auto& t : targets)
    if (std::find(modules.begin(), modules.end(), t) == modules.end()) {
      std::string names;
      for (const auto& m : modules) names += (names.empty() ? "" : ", ") + m;
      out.error = "Module '" + t + "' not found in pipeline (modules: " + names + ")";
      return out;
    }
  const std::set<std::string> unique(targets.begin(), targets.end());
  switch (req.source) {
    case msg::source_kind::checkpoint: return plan_checkpoint(req, unique);
  }
  out.error = "unknown weight source kind " + msg::to_string(req.source);
  return out;
}

}  // namespace refit::actors
