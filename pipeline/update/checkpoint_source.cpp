#include "pipeline/update/checkpoint_source.hpp"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "pipeline/models/model_loader.hpp"
#include "pipeline/update/module_updater.hpp"
#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::update {

checkpoint_source::checkpoint_source(std::filesystem::path module_dir, weights::file_scope scope)
    : dir_(std::move(module_dir)), scope_(std::move(scope)) {}
checkpoint_source::~checkpoint_source() = default;

source_plan checkpoint_source::plan(const module_context& m) {
  auto w = std::make_unique<weights::module_weights>(weights::open_module_dir(m.module, dir_, scope_));
  models::validate_against(m.registry, *w);
  source_plan p;
  p.slots.resize(m.registry.slots().size());
  for (size_t i = 0; i < p.slots.size(); ++i) p.slots[i] = i;
  p.bytes = w->total_bytes;
  opened_ = std::move(w);
  return p;
}

namespace {

// Copies `from` into `to` (same shapes and dtype); false when they do not match. Waits for the copies.
bool copy_values(const std::vector<at::Tensor>& from, const std::vector<at::Tensor>& to) {
  for (size_t k = 0; k < to.size(); ++k)
    if (from[k].sizes() != to[k].sizes() || from[k].scalar_type() != to[k].scalar_type()) return false;
  for (size_t k = 0; k < to.size(); ++k) to[k].copy_(from[k], /*non_blocking=*/true);
  std::vector<c10::Device> devices;
  for (const auto* side : {&to, &from})
    for (const auto& t : *side)
      if (std::find(devices.begin(), devices.end(), t.device()) == devices.end()) devices.push_back(t.device());
  for (const auto& d : devices)
    if (!d.is_cpu()) c10::impl::getDeviceGuardImpl(d.type())->synchronizeDevice(d.has_index() ? d.index() : 0);
  return true;
}

}  // namespace

// Read once per host, from the sibling's stage: its replicas were adopted (nothing left to fill), or its staged values
// are copied here. False when it holds nothing to copy (the files are read then).
bool checkpoint_source::fill_from_sibling(const module_context& m, const fill_target& target) {
  if (target.slots.empty()) {
    spdlog::info("module {} (worker {}): holds the replicas worker {}'s read of {} made on {} (read once)", m.module, m.worker,
                 sibling_worker_, dir_.string(), m.where.device.str());
    return true;
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto values = sibling_->staged_values(target.slots, dir_.string());
  if (!values || !copy_values(*values, target.destinations)) {
    spdlog::info("module {} (worker {}): worker {} holds no staged copy of {}; reading the files", m.module, m.worker, sibling_worker_,
                 dir_.string());
    return false;
  }
  uint64_t bytes = 0;
  for (const auto& t : target.destinations) bytes += t.nbytes();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  spdlog::info("module {} (worker {}): copied {:.1f} MB of {} from worker {}'s staged weights to {} in {:.3f} s ({:.2f} GB/s; read once)",
               m.module, m.worker, bytes / 1e6, dir_.string(), sibling_worker_, m.where.device.str(), s, s > 0 ? bytes / s / 1e9 : 0.0);
  opened_.reset();
  return true;
}

void checkpoint_source::fill(const module_context& m, const fill_target& target) {
  if (sibling_ && fill_from_sibling(m, target)) return;
  std::unique_ptr<weights::module_weights> w = std::move(opened_);
  {
    std::lock_guard lock(replicas_mutex_);
    replicas_.clear();
  }
  if (!w) {
    w = std::make_unique<weights::module_weights>(weights::open_module_dir(m.module, dir_, scope_));
    models::validate_against(m.registry, *w);
  }
  const auto t0 = std::chrono::steady_clock::now();
  weights::named_tensors named;
  uint64_t bytes = 0;
  for (size_t k = 0; k < target.slots.size(); ++k) {
    named.emplace_back(m.registry.slots().at(target.slots[k]).name, target.destinations[k]);
    bytes += target.destinations[k].nbytes();
  }
  // Read once per host: replicas on the workers this stage fans out to (GPU reads only), filled as the read goes.
  std::vector<std::vector<at::Tensor>> replicas(named.size());
  std::vector<int32_t> replicated;
  if (m.loader && !named.empty())
    for (const auto& [worker, device] : fan_out_) {
      try {
        std::vector<at::Tensor> made;
        for (const auto& [name, dst] : named) made.push_back(at::empty(dst.sizes(), dst.options().device(device)));
        for (size_t k = 0; k < made.size(); ++k) replicas[k].push_back(made[k]);
        replicated.push_back(worker);
      } catch (const std::exception& e) {
        spdlog::warn("module {} (worker {}): no room for a replica on worker {} ({}); it copies or reads the files itself", m.module,
                     m.worker, worker, device.str());
      }
    }
  models::read_checkpoint(*w, named, m.where, m.loader, replicated.empty() ? nullptr : &replicas);
  if (!replicated.empty()) {
    std::lock_guard lock(replicas_mutex_);
    for (size_t r = 0; r < replicated.size(); ++r)
      for (size_t k = 0; k < target.slots.size(); ++k) replicas_[replicated[r]][target.slots[k]] = replicas[k][r];
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::string also;
  for (int32_t r : replicated) also += (also.empty() ? " and worker " : ", ") + std::to_string(r);
  spdlog::info("module {} (worker {}): read {:.1f} MB from {} to {}{} in {:.3f} s ({:.2f} GB/s)", m.module, m.worker, bytes / 1e6,
               dir_.string(), m.where.device.str(), also, s, s > 0 ? bytes / s / 1e9 : 0.0);
}

at::Tensor checkpoint_source::take_replica(int32_t worker, size_t slot) {
  std::lock_guard lock(replicas_mutex_);
  auto w = replicas_.find(worker);
  if (w == replicas_.end()) return {};
  auto it = w->second.find(slot);
  if (it == w->second.end()) return {};
  at::Tensor t = std::move(it->second);
  w->second.erase(it);
  return t;
}

at::Tensor checkpoint_source::adopt(const module_context& m, size_t slot, const at::Tensor& current) {
  if (!sibling_) return {};
  at::Tensor t = sibling_->take_staged_replica(slot, dir_.string(), m.worker);
  if (!t.defined() || t.device() != current.device() || t.sizes() != current.sizes() || t.scalar_type() != current.scalar_type() ||
      !t.is_contiguous())
    return {};
  return t;
}

}  // namespace refit::update
