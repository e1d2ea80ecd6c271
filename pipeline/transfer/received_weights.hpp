// Tensors a worker received from a trainer for one update, and the weight source that writes them into
// a module. The transfer happens first, into these buffers, with no module touched; the update
// transaction then stages and commits from them like from any other source, and a trainer that dies
// mid-transfer costs nothing but the buffers. Where a received tensor already is what the module would
// hold (same dtype, shape and device, its own storage), staging adopts it instead of copying.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "pipeline/update/weight_source.hpp"

namespace refit::transfer {

// What one worker received for one update: per module, tensor name -> value (the announced dtype and
// shape). Released when the update ends; whatever a module adopted lives on as its weights.
class received_weights {
 public:
  // `borrowed`: the values live in someone else's memory (a colocated trainer's shared tensors), so a module
  // copies them and never keeps them as its weights.
  explicit received_weights(std::string origin, bool borrowed = false) : origin_(std::move(origin)), borrowed_(borrowed) {}
  const std::string& origin() const { return origin_; }  // e.g. "distributed group 'g' (3 tensors)"
  bool borrowed() const { return borrowed_; }

  void add(const std::string& module, const std::string& name, at::Tensor value);
  // Null when absent or released.
  std::shared_ptr<const std::map<std::string, at::Tensor>> module(const std::string& name) const;
  std::vector<std::string> modules() const;
  uint64_t bytes() const;
  void release();
  bool released() const;

 private:
  mutable std::mutex mutex_;
  std::string origin_;
  bool borrowed_ = false;
  std::map<std::string, std::shared_ptr<std::map<std::string, at::Tensor>>> by_module_;
  bool released_ = false;
};

// The received sets of one worker, by update number; shared by the worker's transfer actor (which adds
// and releases) and its module actors (which read).
class received_table {
 public:
  void put(uint64_t update, std::shared_ptr<received_weights> set);
  std::shared_ptr<received_weights> find(uint64_t update) const;
  // Releases the set's buffers and forgets it; false when there was none.
  bool release(uint64_t update);

 private:
  mutable std::mutex mutex_;
  std::map<uint64_t, std::shared_ptr<received_weights>> sets_;
};

// A module's share of a received set. plan: every received name exists in the module with that shape and
// a dtype that converts to the held one. fill: copies (converting). Repeatable until the set is released.
class received_source : public update::module_source {
 public:
  explicit received_source(std::shared_ptr<received_weights> set);
  std::string origin() const override;
  update::source_plan plan(const update::module_context& module) override;
  void fill(const update::module_context& module, const update::fill_target& target) override;
  at::Tensor adopt(const update::module_context& module, size_t slot, const at::Tensor& current) override;
  bool repeatable() const override;

 private:
  std::shared_ptr<const std::map<std::string, at::Tensor>> tensors(const update::module_context& module) const;
  std::shared_ptr<received_weights> set_;
};

}  // namespace refit::transfer
