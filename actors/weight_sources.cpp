#include "actors/weight_sources.hpp"

#include <stdexcept>

#include "actors/module_actor.hpp"
#include "pipeline/lora/adapter.hpp"
#include "pipeline/lora/lora_source.hpp"
#include "pipeline/transfer/received_weights.hpp"
#include "pipeline/update/checkpoint_source.hpp"
#include "pipeline/update/module_updater.hpp"

namespace refit::actors {

namespace {

std::shared_ptr<transfer::received_weights> received_for(const msg::weight_source& source, const module_state& state) {
  auto set = state.received ? state.received->find(source.update) : nullptr;
  if (!set)
    throw std::invalid_argument("this worker holds nothing received for update " + std::to_string(source.update) + " from " + source.location);
  return set;
}

// The files a source may read: beneath its roots when the update came from a client, anywhere when the
// source is the operator's own (no roots).
weights::file_scope scope_of(const msg::weight_source& source) {
  if (source.roots.empty()) return {};
  return weights::file_scope(std::vector<std::filesystem::path>(source.roots.begin(), source.roots.end()));
}

std::shared_ptr<update::module_source> open_lora(const msg::weight_source& source, module_state& state) {
  if (!state.adapters) throw std::invalid_argument("this server keeps no LoRA adapters");
  const std::string& module = state.core->module();
  std::vector<lora::lora_source::applied> adapters;
  for (const auto& e : source.adapters) {
    const std::optional<double> alpha = e.alpha > 0 ? std::optional<double>(e.alpha) : std::nullopt;
    std::shared_ptr<const lora::adapter> a;
    if (e.received) {
      auto tensors = received_for(source, state)->module(module);
      if (!tensors) throw std::invalid_argument("nothing was received for module '" + module + "'");
      a = state.adapters->pending(e.nickname, source.update);
      if (!a || a->module != module) {
        a = lora::adapter_from_tensors(e.nickname, module, *tensors, alpha);
        state.adapters->put(a, source.update);
      }
    } else if (!e.path.empty()) {
      a = state.adapters->load(e.nickname, e.path, module, alpha, source.update, scope_of(source));
    } else {
      a = state.adapters->pending(e.nickname, source.update);  // loaded by this update for another adapter entry
      if (!a) a = state.adapters->find(e.nickname);
      if (!a) throw std::invalid_argument("Adapter " + e.nickname + " not found in the pipeline. Please provide lora_path to load it.");
      if (a->module != module)
        throw std::invalid_argument("adapter '" + e.nickname + "' was loaded for module '" + a->module + "', not '" + module + "'");
    }
    if (e.rank > 0)
      for (const auto& l : a->layers)
        if (l.rank() != e.rank)
          throw std::invalid_argument("adapter '" + e.nickname + "': layer '" + l.weight + "' has rank " + std::to_string(l.rank()) +
                                      ", not the lora_rank " + std::to_string(e.rank) + " the request names");
    adapters.push_back({std::move(a), e.strength});
  }
  return std::make_shared<lora::lora_source>(std::move(adapters), state.core->origins());
}

}  // namespace

std::shared_ptr<update::module_source> open_source(const msg::weight_source& named, module_state& state) {
  msg::weight_source source = named;
  if (state.paths) {
    source.location = state.paths->map(source.location);
    for (auto& r : source.roots) r = state.paths->map(r);
    for (auto& a : source.adapters) a.path = state.paths->map(a.path);
  }
  switch (source.kind) {
    case msg::source_kind::checkpoint: {
      auto c = std::make_shared<update::checkpoint_source>(source.location, scope_of(source));
      if (source.copy_from >= 0 && state.siblings)
        if (auto it = state.siblings->find(source.copy_from); it != state.siblings->end()) c->copy_staged_from(it->second, source.copy_from);
      if (!source.copy_to.empty() && state.siblings) {
        std::vector<std::pair<int32_t, c10::Device>> to;
        for (int32_t w : source.copy_to)
          if (auto it = state.siblings->find(w); it != state.siblings->end() && it->second->device().is_cuda())
            to.emplace_back(w, it->second->device());
        c->fan_out_to(std::move(to));
      }
      return c;
    }
    case msg::source_kind::distributed: return std::make_shared<transfer::received_source>(received_for(source, state));
    case msg::source_kind::lora: return open_lora(source, state);
    case msg::source_kind::tensor: break;  // shared tensors reach modules as what their worker opened (distributed)
  }
  throw std::invalid_argument("unknown weight source kind " + msg::to_string(source.kind));
}

}  // namespace refit::actors
