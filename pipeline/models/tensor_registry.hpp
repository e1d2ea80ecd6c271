// Every parameter and buffer of a model, under its checkpoint name (DESIGN.md section 2: the C++
// module tree mirrors the Diffusers/Transformers names, so loading is a lookup).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace refit::models {

struct tensor_slot {
  std::string name;             // e.g. "transformer_blocks.0.attn.to_q.weight"
  at::Tensor* tensor;           // the member that holds it
  std::vector<int64_t> shape;   // what the model expects
  bool is_buffer = false;
  // Fixed dtype (e.g. int64 `num_batches_tracked`); nullopt: the model's floating dtype.
  std::optional<c10::ScalarType> fixed_dtype;
};

class tensor_registry {
 public:
  void add(tensor_slot slot);
  const std::vector<tensor_slot>& slots() const { return slots_; }
  const tensor_slot* find(std::string_view name) const;
  uint64_t numel() const;

 private:
  std::vector<tensor_slot> slots_;
};

// A prefix inside a registry: models bind their members through it, submodules get sub-scopes.
class registry_scope {
 public:
  registry_scope(tensor_registry& registry, std::string prefix = "") : registry_(&registry), prefix_(std::move(prefix)) {}
  registry_scope sub(std::string_view name) const;
  registry_scope sub(size_t index) const { return sub(std::to_string(index)); }
  void param(std::string_view name, at::Tensor& slot, std::vector<int64_t> shape) const;
  void buffer(std::string_view name, at::Tensor& slot, std::vector<int64_t> shape,
              std::optional<c10::ScalarType> fixed_dtype = std::nullopt) const;

 private:
  tensor_registry* registry_;
  std::string prefix_;
};

}  // namespace refit::models
