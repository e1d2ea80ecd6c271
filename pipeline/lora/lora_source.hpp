// LoRA adapters merged into a module's weights, as a weight source: the update core validates, stages,
// commits and rolls a merge back like any other update.
//
// The source keeps the base value of every weight an adapter touches (a copy taken the first time the weight
// is merged, on the device when it fits there, else in pinned host memory; then handed from one merge to the
// next), and writes base + Σ strength·scaling·(B @ A),
// computed in fp32 on the module's device in the adapters' order (PEFT's arithmetic: (B @ A) * scaling,
// then added), rounded once to the held dtype. A source with no adapters writes the kept base values back:
// an unmerge is a byte copy, bit for bit, never a subtraction. Weights merged before and not targeted now
// get their base back in the same update, so switching adapters is one transaction.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pipeline/update/weight_source.hpp"

namespace refit::lora {

struct adapter;

class lora_source : public update::module_source {
 public:
  struct applied {
    std::shared_ptr<const lora::adapter> merged;
    double strength = 1;
  };
  // `current`: the sources the module's slots hold values from now (one per registry slot), from which the
  // kept base values of earlier merges are taken over.
  lora_source(std::vector<applied> adapters, const std::vector<std::shared_ptr<update::module_source>>& current);

  std::string origin() const override;
  update::source_plan plan(const update::module_context& module) override;
  void fill(const update::module_context& module, const update::fill_target& target) override;
  bool repeatable() const override { return true; }
  std::vector<update::adapter_info> merged_adapters() const override;
  // The kept base values on the device move to pinned host memory (later merges read them from there).
  uint64_t release_device_memory() override;

  // Weights whose base this source keeps, and their bytes (host memory).
  size_t kept_weights() const { return base_.size(); }
  uint64_t kept_bytes() const;

 private:
  std::vector<applied> adapters_;
  std::map<size_t, at::Tensor> base_;  // registry slot -> its value before any adapter
};

}  // namespace refit::lora
