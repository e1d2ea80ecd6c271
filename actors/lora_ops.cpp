#include "actors/lora_ops.hpp"

#include <cstdio>

#include "actors/update_plan.hpp"
#include "pipeline/lora/adapter.hpp"

namespace refit::actors {

std::string invalid_lora_target(const std::string& target, const std::string& denoiser) {
  return "Invalid target(s): ['" + target + "']. Valid targets: ['all', '" + denoiser + "']";
}

std::variant<msg::update_request, std::string> lora_registry::plan(const msg::lora_request& req, const std::string& denoiser,
                                                                   const lora::adapter_store& adapters) const {
  if (req.target != "all" && req.target != denoiser) return invalid_lora_target(req.target, denoiser);
  msg::update_request u;
  u.source = msg::source_kind::lora;
  u.target_modules = {denoiser};
  u.weight_version = req.weight_version;
  switch (req.op) {
    case msg::lora_op::set:
      if (req.adapters.empty()) return std::string("lora_nickname names no adapter");
      for (const auto& e : req.adapters) {
        if (e.nickname.empty()) return std::string("lora_nickname must not be empty");
        if (e.path.empty() && !adapters.find(e.nickname))
          return "Adapter " + e.nickname + " not found in the pipeline. Please provide lora_path to load it.";
      }
      u.adapters = req.adapters;
      break;
    case msg::lora_op::merge: {
      auto it = set_.find(denoiser);
      if (it == set_.end()) return "No LoRA adapter was set on '" + denoiser + "'; call /v1/set_lora first";
      u.adapters = it->second;
      for (auto& e : u.adapters) {
        e.path.clear();  // the adapter as it was loaded then
        e.strength = req.strength;
      }
      break;
    }
    case msg::lora_op::unmerge: break;
  }
  return u;
}

std::string lora_registry::version_after(const msg::update_request& u, const std::string& served, const std::string& fallback) {
  const bool lora = u.source == msg::source_kind::lora || u.lora_merge;
  if (!lora) {
    base_version_.clear();  // the weights are a new base
    return u.weight_version.empty() ? fallback : u.weight_version;
  }
  if (base_version_.empty()) base_version_ = served;
  std::string derived = base_version_;
  if (u.adapters.empty() && !u.lora_merge) {
    base_version_.clear();
  } else {
    derived += "+lora:";
    const auto& entries = u.adapters;
    if (u.lora_merge) derived += received_adapter(u, u.target_modules.empty() ? std::string() : u.target_modules.front()) + "@1.00";
    for (size_t i = 0; i < entries.size(); ++i) {
      char strength[32];
      std::snprintf(strength, sizeof strength, "%.2f", entries[i].strength);
      derived += (i ? "," : "") + entries[i].nickname + "@" + strength;
    }
  }
  return u.weight_version.empty() ? derived : u.weight_version;
}

void lora_registry::committed(const msg::update_request& u, const std::string& denoiser) {
  const std::vector<std::string> targets = u.target_modules.empty() ? std::vector<std::string>{denoiser} : u.target_modules;
  if (u.lora_merge) {
    for (const auto& m : targets) set_[m] = {{received_adapter(u, m), "", 1.0, u.lora_alpha, false}};
    return;
  }
  if (u.source != msg::source_kind::lora || u.adapters.empty()) return;
  for (const auto& m : targets) set_[m] = u.adapters;
}

}  // namespace refit::actors
