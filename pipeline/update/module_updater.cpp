#include "pipeline/update/module_updater.hpp"

#include "pipeline/update/checkpoint_source.hpp"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <stdexcept>

#include "pipeline/models/layer_offload.hpp"
#include "pipeline/models/model_loader.hpp"
#include "pipeline/pipeline.hpp"
#include "pipeline/update/finite_check.hpp"
#include "pipeline/update/memory.hpp"
#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::update {

using clock = std::chrono::steady_clock;

namespace {
double since(clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); }

uint64_t total_bytes(const std::vector<at::Tensor>& ts) {
  uint64_t b = 0;
  for (const auto& t : ts)
    if (t.defined()) b += t.nbytes();
  return b;
}

const char* label(write_path p) {
  switch (p) {
    case write_path::staged: return "staged";
    case write_path::in_place: return "in place";
    case write_path::in_place_reread_undo: return "in place, undo by re-reading";
    case write_path::reread: return "re-read";
    case write_path::none: break;
  }
  return "none";
}

// check_finite: throws naming the first of `values` (the new values of `slots`, in order) that is not finite.
void refuse_non_finite(const models::tensor_registry& registry, const std::vector<size_t>& slots, const std::vector<at::Tensor>& values) {
  const auto bad = first_non_finite(values);
  if (!bad) return;
  const std::string name = *bad < slots.size() ? "tensor '" + registry.slots().at(slots[*bad]).name + "'" : std::string("a tensor");
  throw std::runtime_error(name + " holds NaN or infinite values: non-finite weights are refused (check_finite; "
                                  "send \"check_finite\": false to accept them)");
}
}  // namespace

// One update between stage and its end (finalize, restore).
struct module_updater::pending {
  std::shared_ptr<module_source> source;
  source_plan plan;
  write_path path = write_path::none;  // staged or in_place, chosen at stage
  std::vector<at::Tensor> shadows;     // staged: the new values, one per planned slot
  std::vector<at::Tensor> undo;        // after commit: what was held before, one per planned slot
  bool committed = false;
  bool swapped_stores = false;         // staged commit of offloaded slots: the offload's host stores were swapped
  bool undo_by_reread = false;         // in place without a snapshot: restore re-reads the slots' origins
  bool rollback_owed = false;          // a rollback of the committed update failed: the next stage finishes it
  bool check_finite = false;           // the new values must be finite (stage, or commit when in place)
};

module_updater::module_updater(std::shared_ptr<pipeline::diffusion_pipeline> pipe, std::string module, int32_t worker,
                               std::shared_ptr<module_source> loaded_from, std::shared_ptr<weights::device_loader> loader)
    : pipe_(std::move(pipe)), module_(std::move(module)), worker_(worker), loader_(std::move(loader)) {
  origins_.assign(registry().slots().size(), std::move(loaded_from));
  if (const auto* c = pipe_->layout().find(module_)) class_name_ = c->class_name;
}

module_updater::~module_updater() = default;

at::Tensor module_updater::take_staged_replica(size_t slot, const std::string& origin, int32_t worker) const {
  if (!pending_ || pending_->committed || pending_->path != write_path::staged || pending_->source->origin() != origin) return {};
  auto* c = dynamic_cast<checkpoint_source*>(pending_->source.get());
  return c ? c->take_replica(worker, slot) : at::Tensor();
}

std::optional<std::vector<at::Tensor>> module_updater::staged_values(const std::vector<size_t>& slots, const std::string& origin) const {
  if (!pending_ || pending_->committed || pending_->path != write_path::staged || pending_->source->origin() != origin) return std::nullopt;
  const auto& planned = pending_->plan.slots;
  std::vector<at::Tensor> out;
  out.reserve(slots.size());
  for (size_t slot : slots) {
    const auto it = std::lower_bound(planned.begin(), planned.end(), slot);
    if (it == planned.end() || *it != slot || offloaded(slot)) return std::nullopt;
    out.push_back(pending_->shadows[static_cast<size_t>(it - planned.begin())]);
  }
  return out;
}

models::tensor_registry& module_updater::registry() const { return pipe_->registry(module_); }
models::layer_offload* module_updater::offload() const { return pipe_->offload(module_); }
bool module_updater::offloaded(size_t slot) const {
  const auto* off = offload();
  return off && off->offloaded(slot);
}

c10::Device module_updater::device() const { return pipe_->placement().device; }

module_context module_updater::context() const { return {module_, worker_, registry(), pipe_->placement(), loader_.get()}; }

std::vector<at::Tensor> module_updater::held(const std::vector<size_t>& slots) const {
  const std::vector<at::Tensor> all = models::held_tensors(registry(), offload());
  std::vector<at::Tensor> out;
  out.reserve(slots.size());
  for (size_t s : slots) out.push_back(all.at(s));
  return out;
}

// Whether the committed update this state holds was decided by its transaction (every participant
// committed) and no rollback of it is owed. Each commit gets its own number, so a later commit that was
// not decided never matches an earlier decision.
bool module_updater::holds_decided_commit() const {
  return pending_ && pending_->committed && !pending_->rollback_owed && commits_ > 0 && decided_ == commits_;
}

void module_updater::mark_decided() {
  if (lose_decision_.exchange(false)) return;  // test builds only (fault "decide"/"lost")
  decided_ = commits_.load();
}

phase_report module_updater::validate(module_source& source) {
  const auto t0 = clock::now();
  const source_plan p = source.plan(context());
  return {write_path::none, p.slots.size(), p.bytes, since(t0), source.origin()};
}

phase_report module_updater::stage(std::shared_ptr<module_source> source, requested_path requested, bool check_finite) {
  c10::InferenceMode inference;
  const auto t0 = clock::now();
  if (holds_decided_commit()) {
    // An earlier update committed here and was decided, but its finalize never arrived: its weights are
    // what this module serves, so its undo record goes (a rollback of this update must not reach back
    // past it).
    spdlog::warn("module {} (worker {}): an earlier update from {} was decided but not finalized; keeping its weights", module_,
                 worker_, pending_->source->origin());
    finalize_pending();
  } else if (pending_ && pending_->committed) {
    // An earlier update that was not decided (or whose rollback failed here) is still in place: finish
    // undoing it first.
    const write_path how = restore();
    spdlog::warn("module {} (worker {}): undid an earlier update that was never decided ({})", module_, worker_, label(how));
  }
  end_update();
  if (released_) throw std::runtime_error("the module's device memory is released (release_memory_occupation): resume it first");
  auto p = std::make_unique<pending>();
  p->source = std::move(source);
  p->check_finite = check_finite;
  p->plan = p->source->plan(context());
  const std::vector<size_t>& slots = p->plan.slots;
  const std::vector<at::Tensor> live = held(slots);
  // Offloaded slots are staged into the offload's second host store (kept for later updates once
  // allocated), the rest into fresh shadows on the device.
  auto* off = offload();
  uint64_t shadow_bytes = 0;
  bool touches_store = false;
  // Values the source already holds exactly as the module would cost no shadow: staging adopts them.
  std::vector<at::Tensor> adopted(slots.size());
  for (size_t k = 0; k < slots.size(); ++k) {
    if (offloaded(slots[k])) {
      touches_store = true;
      continue;
    }
    adopted[k] = p->source->adopt(context(), slots[k], live[k]);
    if (!adopted[k].defined()) shadow_bytes += live[k].nbytes();
  }
  const bool spare_fits = !touches_store || off->spare_allocated() || off->host_bytes() + memory_margin <= available_host_bytes();
  p->path = requested == requested_path::staged   ? write_path::staged
            : requested == requested_path::in_place ? write_path::in_place
            : fits_on(pipe_->placement().device, shadow_bytes) && spare_fits ? write_path::staged
                                                                             : write_path::in_place;
  const uint64_t bytes = total_bytes(live);
  pending_ = std::move(p);
  pending& u = *pending_;
  if (u.path == write_path::staged) {
    try {
      std::vector<size_t> fill_slots;
      std::vector<at::Tensor> fill_into, fill_current;
      for (size_t k = 0; k < slots.size(); ++k) {
        if (adopted[k].defined()) {
          u.shadows.push_back(adopted[k]);
          continue;
        }
        u.shadows.push_back(offloaded(slots[k]) ? off->spare_tensor(slots[k]) : at::empty_like(live[k]));
        fill_slots.push_back(slots[k]);
        fill_into.push_back(u.shadows.back());
        fill_current.push_back(live[k]);
      }
      if (touches_store) {
        // The swap at commit makes the whole second store live: offloaded slots this update does not
        // write must hold their current values there too.
        const std::vector<at::Tensor> all = models::held_tensors(registry(), off);
        size_t k = 0;
        for (size_t s = 0; s < all.size(); ++s) {
          while (k < slots.size() && slots[k] < s) ++k;
          if (off->offloaded(s) && !(k < slots.size() && slots[k] == s)) off->spare_tensor(s).copy_(all[s]);
        }
      }
      if (!fill_slots.empty()) u.source->fill(context(), {fill_slots, fill_into, fill_current});
      if (u.check_finite) refuse_non_finite(registry(), slots, u.shadows);
    } catch (...) {
      u.shadows.clear();
      throw;
    }
  }
  path_ = u.path;
  tensors_ = slots.size();
  bytes_ = bytes;
  return {u.path, slots.size(), u.path == write_path::staged ? bytes_ : 0, since(t0), u.source->origin()};
}

phase_report module_updater::commit() {
  c10::InferenceMode inference;
  const auto t0 = clock::now();
  if (!pending_) throw std::logic_error("commit without a staged update");
  pending& u = *pending_;
  const std::vector<size_t>& slots = u.plan.slots;
  auto& reg = registry().slots();
  auto* off = offload();
  if (u.path == write_path::staged) {
    if (u.shadows.size() != slots.size()) throw std::logic_error("commit without staged weights");
    std::vector<at::Tensor> undo;
    bool touches_store = false;
    for (size_t k = 0; k < slots.size(); ++k) {  // offloaded: the live store, the second store after the swap
      touches_store |= offloaded(slots[k]);
      undo.push_back(offloaded(slots[k]) ? off->host_tensor(slots[k]) : *reg[slots[k]].tensor);
    }
    // The one step that can fail comes first and is all or nothing; the rest cannot fail.
    if (touches_store) off->swap_stores();  // the staged host store goes live; resident blocks are rewritten
    u.swapped_stores = touches_store;
    for (size_t k = 0; k < slots.size(); ++k)
      if (!offloaded(slots[k])) *reg[slots[k]].tensor = u.shadows[k];  // a swap of storage, not a copy
    u.undo = std::move(undo);
    u.shadows.clear();
    u.committed = true;
    ++commits_;
    return {write_path::staged, slots.size(), bytes_, since(t0), u.source->origin()};
  }
  // In place: keep what is live in host memory first (or, when that does not fit, plan to re-read the
  // slots' previous source), then write the new values over the live tensors.
  if (off) off->quiesce();  // no block copy may read the host store while it is rewritten
  const std::vector<at::Tensor> live = held(slots);
  const uint64_t bytes = total_bytes(live);
  u.undo.clear();
  u.undo_by_reread = force_reread_undo_ || bytes + memory_margin > available_host_bytes();
  if (u.undo_by_reread) {
    for (size_t s : slots)
      if (!origins_[s]->repeatable())
        throw std::runtime_error("no room in host memory for an undo snapshot of " + std::to_string(bytes / 1000000) +
                                 " MB, and the values held now came from " + origins_[s]->origin() +
                                 ", which cannot be read again: not writing in place (free host memory, or use mode 'staged')");
  } else {
    const bool on_gpu = !pipe_->placement().device.is_cpu();
    if (on_gpu && undo_arena_.size() != reg.size()) undo_arena_ = make_undo_arena(models::held_tensors(registry(), off));
    for (size_t k = 0; k < slots.size(); ++k) {
      at::Tensor host = on_gpu ? undo_arena_[slots[k]] : at::empty_like(live[k]);
      host.copy_(live[k]);
      u.undo.push_back(host);
    }
  }
  u.committed = true;
  ++commits_;  // this commit's own number: a half-written one can never match an earlier decision
  try {
    u.source->fill(context(), {slots, live, live});
    if (u.check_finite) refuse_non_finite(registry(), slots, live);
    if (off) off->refresh_resident();
  } catch (...) {
    restore();  // a half-written module must not stay live
    throw;
  }
  return {u.undo_by_reread ? write_path::in_place_reread_undo : write_path::in_place, slots.size(), bytes, since(t0),
          u.source->origin()};
}

void module_updater::rollback_requested() {
  if (pending_) pending_->rollback_owed = pending_->committed;  // cleared by restore() when it succeeds
}

phase_report module_updater::rollback() {
  c10::InferenceMode inference;
  const auto t0 = clock::now();
  const uint64_t bytes = bytes_;
  const write_path how = restore();
  return {how, tensors_, bytes, since(t0), source_of()};
}

phase_report module_updater::finalize() {
  const auto t0 = clock::now();
  finalize_pending();
  return {path_, tensors_, bytes_, since(t0), source_of()};
}

phase_report module_updater::discard() {
  c10::InferenceMode inference;
  const auto t0 = clock::now();
  const write_path how = restore();
  return {how, tensors_, 0, since(t0), source_of()};
}

bool module_updater::on_actor_start() {
  if (holds_decided_commit()) {
    // The predecessor died after its update was decided: keep the new weights, drop the undo record.
    spdlog::warn("module {} (worker {}): respawned actor kept the decided update from {}", module_, worker_, pending_->source->origin());
    finalize_pending();
    return true;
  }
  if (pending_ && (pending_->committed || !pending_->shadows.empty())) {
    c10::InferenceMode inference;
    try {
      const write_path how = restore();
      spdlog::warn("module {} (worker {}): respawned actor undid an unfinished update ({})", module_, worker_, label(how));
    } catch (const std::exception& e) {
      problem_ = std::string("its actor died during an update and the replacement could not undo it: ") + e.what();
      spdlog::error("module {} (worker {}): respawned actor could not undo an unfinished update: {}", module_, worker_, e.what());
    }
  }
  return false;
}

// Puts back what was held before commit and ends the update. Returns how it was done.
write_path module_updater::restore() {
  if (!pending_) {
    problem_.clear();
    return path_ == write_path::staged ? write_path::staged : write_path::in_place;
  }
  pending& u = *pending_;
  write_path how = u.path == write_path::staged ? write_path::staged : write_path::in_place;
  if (u.committed) {
    const std::vector<size_t>& slots = u.plan.slots;
    auto& reg = registry().slots();
    auto* off = offload();
    if (u.path == write_path::staged) {
      for (size_t k = 0; k < slots.size(); ++k)
        if (!offloaded(slots[k])) *reg[slots[k]].tensor = u.undo[k];
      if (u.swapped_stores) off->swap_stores();  // the previous host store is live again, and so are its resident blocks
    } else {
      if (off) off->quiesce();
      const std::vector<at::Tensor> live = held(slots);
      try {
        if (u.undo_by_reread) {
          refill_from_origins(slots, live);
          how = write_path::reread;
        } else {
          for (size_t k = 0; k < slots.size(); ++k) live[k].copy_(u.undo[k]);
        }
      } catch (...) {
        if (off) off->refresh_resident();  // the device copies follow the host store, whatever it now holds
        throw;
      }
      if (off) off->refresh_resident();
    }
  }
  problem_.clear();
  end_update();
  return how;
}

// Fills `destinations` (one per slot) with the values the slots held before the update in progress,
// from the sources they came from.
void module_updater::refill_from_origins(const std::vector<size_t>& slots, const std::vector<at::Tensor>& destinations) {
  std::map<module_source*, std::pair<std::vector<size_t>, std::vector<at::Tensor>>> by_origin;
  for (size_t k = 0; k < slots.size(); ++k) {
    auto& group = by_origin[origins_[slots[k]].get()];
    group.first.push_back(slots[k]);
    group.second.push_back(destinations[k]);
  }
  for (auto& [origin, group] : by_origin) origin->fill(context(), {group.first, group.second, group.second});
}

// Makes the committed update permanent: the undo record goes, its source becomes the slots' origin.
void module_updater::finalize_pending() {
  if (pending_ && pending_->committed) {
    for (size_t s : pending_->plan.slots) origins_[s] = pending_->source;
    problem_.clear();  // every weight was just written from a known source
  }
  end_update();
}

void module_updater::end_update() { pending_.reset(); }

// What the module holds: the origin all slots share, or each distinct one.
std::string module_updater::source_of() const {
  std::vector<std::string> distinct;
  for (const auto& o : origins_) {
    const std::string name = o ? o->origin() : "";
    if (std::find(distinct.begin(), distinct.end(), name) == distinct.end()) distinct.push_back(name);
  }
  std::string out;
  for (const auto& d : distinct) out += (out.empty() ? "" : ", ") + d;
  return out;
}

phase_report module_updater::release_memory() {
  c10::InferenceMode inference;
  const auto t0 = clock::now();
  if (released_) return {write_path::none, 0, 0, since(t0), "already released"};
  if (pending_) throw std::logic_error("an update is in progress; release the memory after it ends");
  auto& reg = registry().slots();
  const std::vector<at::Tensor> values = models::held_tensors(registry(), offload());
  uint64_t bytes = 0;
  released_slots_.clear();
  if (pipe_->placement().device.is_cuda()) {
    if (undo_arena_.size() != reg.size()) undo_arena_ = make_undo_arena(values);
    for (size_t s = 0; s < reg.size(); ++s)
      if (!offloaded(s) && values[s].is_cuda()) {
        undo_arena_[s].copy_(values[s], /*non_blocking=*/true);
        released_slots_.push_back(s);
        bytes += values[s].nbytes();
      }
    const auto dev = pipe_->placement().device;
    c10::impl::getDeviceGuardImpl(dev.type())->synchronizeDevice(dev.has_index() ? dev.index() : 0);
    for (size_t s : released_slots_) *reg[s].tensor = undo_arena_[s];  // the device tensors go with their last reference
    // What sources keep on the device for later fills (a LoRA merge's base values) goes to host memory too.
    std::vector<module_source*> seen;
    for (const auto& o : origins_)
      if (o && std::find(seen.begin(), seen.end(), o.get()) == seen.end()) {
        seen.push_back(o.get());
        bytes += o->release_device_memory();
      }
  }
  released_ = true;
  return {write_path::none, released_slots_.size(), bytes, since(t0), "released to pinned host memory"};
}

phase_report module_updater::resume_memory() {
  c10::InferenceMode inference;
  const auto t0 = clock::now();
  if (!released_) return {write_path::none, 0, 0, since(t0), "already resident"};
  auto& reg = registry().slots();
  const auto dev = pipe_->placement().device;
  std::vector<at::Tensor> back;
  uint64_t bytes = 0;
  for (size_t s : released_slots_) {  // all allocated before any slot changes: an allocation failure changes nothing
    back.push_back(at::empty_like(undo_arena_[s], undo_arena_[s].options().device(dev).pinned_memory(false)));
    bytes += back.back().nbytes();
  }
  for (size_t k = 0; k < back.size(); ++k) back[k].copy_(undo_arena_[released_slots_[k]], /*non_blocking=*/true);
  if (!back.empty()) c10::impl::getDeviceGuardImpl(dev.type())->synchronizeDevice(dev.has_index() ? dev.index() : 0);
  for (size_t k = 0; k < back.size(); ++k) *reg[released_slots_[k]].tensor = back[k];
  released_ = false;
  const size_t n = released_slots_.size();
  released_slots_.clear();
  return {write_path::none, n, bytes, since(t0), "resumed on " + dev.str()};
}

module_status module_updater::status() const {
  module_status s;
  s.module = module_;
  s.class_name = class_name_;
  s.dtype = models::dtype_label(pipe_->placement().float_dtype);
  s.device = pipe_->placement().device.str();
  s.worker = worker_;
  s.tensors = registry().slots().size();
  s.bytes = total_bytes(models::held_tensors(registry(), offload()));
  s.source = source_of();
  const module_source* with_adapters = nullptr;
  for (const auto& o : origins_)
    if (o && !o->merged_adapters().empty()) {
      ++s.adapter_tensors;
      with_adapters = o.get();
    }
  if (with_adapters) s.adapters = with_adapters->merged_adapters();
  if (pending_) {
    s.undo_bytes = total_bytes(pending_->undo);
    s.shadow_bytes = total_bytes(pending_->shadows);
  }
  s.problem = problem_;
  return s;
}

}  // namespace refit::update
