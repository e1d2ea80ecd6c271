#include "pipeline/models/tensor_registry.hpp"

#include <stdexcept>

namespace refit::models {

void tensor_registry::add(tensor_slot slot) {
  if (find(slot.name)) throw std::logic_error("tensor '" + slot.name + "' registered twice");
  slots_.push_back(std::move(slot));
}

const tensor_slot* tensor_registry::find(std::string_view name) const {
  for (const auto& s : slots_)
    if (s.name == name) return &s;
  return nullptr;
}

uint64_t tensor_registry::numel() const {
  uint64_t n = 0;
  for (const auto& s : slots_) {
    uint64_t k = 1;
    for (auto d : s.shape) k *= static_cast<uint64_t>(d);
    n += k;
  }
  return n;
}

registry_scope registry_scope::sub(std::string_view name) const {
  return registry_scope(*registry_, prefix_.empty() ? std::string(name) : prefix_ + "." + std::string(name));
}

void registry_scope::param(std::string_view name, at::Tensor& slot, std::vector<int64_t> shape) const {
  registry_->add({sub(name).prefix_, &slot, std::move(shape), false, std::nullopt});
}

void registry_scope::buffer(std::string_view name, at::Tensor& slot, std::vector<int64_t> shape,
                            std::optional<c10::ScalarType> fixed_dtype) const {
  registry_->add({sub(name).prefix_, &slot, std::move(shape), true, fixed_dtype});
}

}  // namespace refit::models
