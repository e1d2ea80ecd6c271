#include "pipeline/transfer/received_weights.hpp"

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "pipeline/models/model_loader.hpp"
#include "pipeline/models/tensor_registry.hpp"

namespace refit::transfer {

namespace {

std::string shape_text(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

bool floating(c10::ScalarType t) { return c10::isFloatingType(t); }

}  // namespace

void received_weights::add(const std::string& module, const std::string& name, at::Tensor value) {
  std::lock_guard lock(mutex_);
  auto& m = by_module_[module];
  if (!m) m = std::make_shared<std::map<std::string, at::Tensor>>();
  (*m)[name] = std::move(value);
}

std::shared_ptr<const std::map<std::string, at::Tensor>> received_weights::module(const std::string& name) const {
  std::lock_guard lock(mutex_);
  if (released_) return nullptr;
  auto it = by_module_.find(name);
  return it == by_module_.end() ? nullptr : it->second;
}

std::vector<std::string> received_weights::modules() const {
  std::lock_guard lock(mutex_);
  std::vector<std::string> out;
  for (const auto& [m, _] : by_module_) out.push_back(m);
  return out;
}

uint64_t received_weights::bytes() const {
  std::lock_guard lock(mutex_);
  uint64_t b = 0;
  for (const auto& [_, m] : by_module_)
    for (const auto& [__, t] : *m) b += t.nbytes();
  return b;
}

void received_weights::release() {
  std::lock_guard lock(mutex_);
  by_module_.clear();
  released_ = true;
}

bool received_weights::released() const {
  std::lock_guard lock(mutex_);
  return released_;
}

void received_table::put(uint64_t update, std::shared_ptr<received_weights> set) {
  std::lock_guard lock(mutex_);
  sets_[update] = std::move(set);
}

std::shared_ptr<received_weights> received_table::find(uint64_t update) const {
  std::lock_guard lock(mutex_);
  auto it = sets_.find(update);
  return it == sets_.end() ? nullptr : it->second;
}

bool received_table::release(uint64_t update) {
  std::shared_ptr<received_weights> set;
  {
    std::lock_guard lock(mutex_);
    auto it = sets_.find(update);
    if (it == sets_.end()) return false;
    set = std::move(it->second);
    sets_.erase(it);
  }
  set->release();
  return true;
}

received_source::received_source(std::shared_ptr<received_weights> set) : set_(std::move(set)) {}

std::string received_source::origin() const { return set_->origin(); }

bool received_source::repeatable() const { return !set_->released(); }

std::shared_ptr<const std::map<std::string, at::Tensor>> received_source::tensors(const update::module_context& m) const {
  auto t = set_->module(m.module);
  if (!t) {
    if (set_->released())
      throw std::runtime_error("the tensors received from " + set_->origin() + " were released when their update ended");
    throw std::invalid_argument("nothing was received for module '" + m.module + "'");
  }
  return t;
}

update::source_plan received_source::plan(const update::module_context& m) {
  const auto received = tensors(m);
  update::source_plan p;
  for (const auto& [name, value] : *received) {
    const models::tensor_slot* slot = m.registry.find(name);
    if (!slot)
      throw std::invalid_argument("module '" + m.module + "' has no tensor '" + name + "'");
    if (value.sizes() != at::IntArrayRef(slot->shape))
      throw std::invalid_argument("tensor '" + name + "' of module '" + m.module + "': shape " + shape_text(value.sizes()) +
                                  " does not match the module's " + shape_text(slot->shape));
    const c10::ScalarType held = models::held_dtype(*slot, m.where);
    if (value.scalar_type() != held && !(floating(value.scalar_type()) && floating(held)))
      throw std::invalid_argument("tensor '" + name + "' of module '" + m.module + "': dtype " +
                                  std::string(c10::toString(value.scalar_type())) + " does not convert to the module's " +
                                  c10::toString(held));
    p.slots.push_back(static_cast<size_t>(slot - m.registry.slots().data()));
    p.bytes += value.nbytes();
  }
  std::sort(p.slots.begin(), p.slots.end());
  return p;
}

void received_source::fill(const update::module_context& m, const update::fill_target& target) {
  const auto received = tensors(m);
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t bytes = 0;
  bool cuda = false;
  for (size_t k = 0; k < target.slots.size(); ++k) {
    const std::string& name = m.registry.slots().at(target.slots[k]).name;
    auto it = received->find(name);
    if (it == received->end()) throw std::logic_error("tensor '" + name + "' was planned but not received");
    const at::Tensor& dst = target.destinations[k];
    if (dst.data_ptr() == it->second.data_ptr()) continue;  // adopted: it is already the value
    dst.copy_(it->second);
    bytes += dst.nbytes();
    cuda |= dst.is_cuda() || it->second.is_cuda();
  }
  if (cuda) {
    // The copies ran on the current stream; the values must be complete when fill returns.
    const auto dev = m.where.device;
    c10::impl::getDeviceGuardImpl(dev.type())->synchronizeDevice(dev.has_index() ? dev.index() : 0);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  spdlog::info("module {} (worker {}): copied {:.1f} MB received from {} in {:.3f} s", m.module, m.worker, bytes / 1e6,
               set_->origin(), s);
}

at::Tensor received_source::adopt(const update::module_context& m, size_t slot, const at::Tensor& current) {
  if (set_->borrowed()) return {};  // the trainer's memory: copied, never kept
  const auto received = set_->module(m.module);
  if (!received) return {};
  auto it = received->find(m.registry.slots().at(slot).name);
  if (it == received->end()) return {};
  const at::Tensor& t = it->second;
  const bool own_storage = t.storage_offset() == 0 && t.storage().nbytes() == t.nbytes();  // not a slice of a bucket
  if (t.scalar_type() != current.scalar_type() || t.device() != current.device() || t.sizes() != current.sizes() ||
      !t.is_contiguous() || !own_storage)
    return {};
  return t;
}

}  // namespace refit::transfer
