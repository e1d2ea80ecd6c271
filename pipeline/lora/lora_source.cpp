#include "pipeline/lora/lora_source.hpp"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdio>
#include <set>
#include <stdexcept>

#include "pipeline/lora/adapter.hpp"
#include "pipeline/models/tensor_registry.hpp"
#include "pipeline/update/memory.hpp"

namespace refit::lora {

lora_source::lora_source(std::vector<applied> adapters, const std::vector<std::shared_ptr<update::module_source>>& current)
    : adapters_(std::move(adapters)) {
  for (size_t s = 0; s < current.size(); ++s)
    if (auto earlier = std::dynamic_pointer_cast<lora_source>(current[s]))
      if (auto it = earlier->base_.find(s); it != earlier->base_.end()) base_[s] = it->second;
}

std::string lora_source::origin() const {
  if (adapters_.empty()) return "base weights (LoRA unmerged)";
  std::string out = "LoRA ";
  for (size_t i = 0; i < adapters_.size(); ++i) {
    char strength[32];
    std::snprintf(strength, sizeof strength, "%.2f", adapters_[i].strength);
    out += (i ? ", " : "") + adapters_[i].merged->nickname + "@" + strength;
  }
  return out + " merged into the base weights";
}

std::vector<update::adapter_info> lora_source::merged_adapters() const {
  std::vector<update::adapter_info> out;
  for (const auto& a : adapters_) out.push_back({a.merged->nickname, a.merged->path, a.strength});
  return out;
}

uint64_t lora_source::release_device_memory() {
  uint64_t moved = 0;
  for (auto& [slot, t] : base_)
    if (t.is_cuda()) {
      at::Tensor host = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
      host.copy_(t);
      moved += t.nbytes();
      t = host;
    }
  return moved;
}

uint64_t lora_source::kept_bytes() const {
  uint64_t n = 0;
  for (const auto& [s, t] : base_) n += t.nbytes();
  return n;
}

update::source_plan lora_source::plan(const update::module_context& m) {
  std::set<size_t> slots;
  for (const auto& [s, t] : base_) slots.insert(s);  // merged before: written again (merged now, or its base)
  for (const auto& a : adapters_) {
    if (a.merged->module != m.module)
      throw std::invalid_argument("adapter '" + a.merged->nickname + "' was read for module '" + a.merged->module + "', not '" + m.module + "'");
    check_fits(*a.merged, m.registry);
    for (const auto& l : a.merged->layers) slots.insert(static_cast<size_t>(m.registry.find(l.weight) - m.registry.slots().data()));
  }
  update::source_plan p;
  p.slots.assign(slots.begin(), slots.end());
  for (size_t s : p.slots) {
    uint64_t n = 1;
    for (int64_t d : m.registry.slots()[s].shape) n *= static_cast<uint64_t>(d);
    p.bytes += n * 4;  // computed in fp32
  }
  return p;
}

void lora_source::fill(const update::module_context& m, const update::fill_target& target) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto& slots = target.slots;
  const at::Device device = m.where.device;
  const bool cuda = device.is_cuda();
  // The base of a weight merged for the first time is what it holds now: kept on the device when it fits there
  // beside the shadows of this update (a copy there costs milliseconds, and later merges read it at device
  // speed), else in pinned host memory (page-locking costs about a second per GB, once).
  uint64_t captured = 0;
  for (size_t k = 0; k < slots.size(); ++k)
    if (!base_.count(slots[k])) captured += target.current[k].nbytes();
  const bool keep_on_device = cuda && captured > 0 && update::fits_on(device, captured);
  for (size_t k = 0; k < slots.size(); ++k) {
    if (base_.count(slots[k])) continue;
    const at::Tensor& now = target.current[k];
    at::Tensor keep = keep_on_device ? at::empty_like(now, now.options().device(device))
                                     : at::empty(now.sizes(), now.options().device(at::kCPU).pinned_memory(cuda));
    keep.copy_(now);
    base_[slots[k]] = keep;
  }
  // weight -> the adapter layers on it, in the adapters' order
  std::map<std::string, std::vector<std::pair<const lora_layer*, double>>> on;
  for (const auto& a : adapters_)
    for (const auto& l : a.merged->layers) on[l.weight].emplace_back(&l, a.strength);
  uint64_t merged = 0;
  for (size_t k = 0; k < slots.size(); ++k) {
    const auto& slot = m.registry.slots().at(slots[k]);
    const at::Tensor& base = base_.at(slots[k]);
    const at::Tensor& dst = target.destinations[k];
    auto it = on.find(slot.name);
    if (it == on.end()) {
      dst.copy_(base);  // not merged (any more): the base, byte for byte
      continue;
    }
    at::Tensor w = at::empty(base.sizes(), at::TensorOptions().dtype(at::kFloat).device(device));
    w.copy_(base, /*non_blocking=*/cuda);
    for (const auto& [layer, strength] : it->second) {
      at::Tensor delta = at::mm(layer->b.to(device, /*non_blocking=*/cuda), layer->a.to(device, /*non_blocking=*/cuda));
      delta.mul_(layer->scaling * strength);
      w.add_(delta);
    }
    dst.copy_(w);
    ++merged;
  }
  if (cuda) c10::impl::getDeviceGuardImpl(device.type())->synchronizeDevice(device.has_index() ? device.index() : 0);
  spdlog::info("module {} (worker {}): {}: merged {} weight(s), restored {} to base, kept {:.1f} MB of new base values{}, in {:.3f} s",
               m.module, m.worker, origin(), merged, slots.size() - merged, captured / 1e6,
               captured == 0 ? "" : keep_on_device ? " on the device" : " in host memory",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

}  // namespace refit::lora
