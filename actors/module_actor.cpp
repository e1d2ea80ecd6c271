#include "actors/module_actor.hpp"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#ifdef REFIT_TORCH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

#include <atomic>
#include <chrono>
#include <fstream>
#include <thread>

#include "pipeline/flux2_klein.hpp"
#include "pipeline/models/layer_offload.hpp"
#include "pipeline/models/model_loader.hpp"
#include "pipeline/weights/checksum.hpp"
#include "pipeline/weights/device_loader.hpp"
#include "pipeline/weights/host_loader.hpp"
#include "pipeline/weights/parallel.hpp"

namespace refit::actors {

using msg::refit_errc;

struct module_state {
  std::shared_ptr<pipeline::flux2_klein_pipeline> pipe;  // live weights live in its modules
  std::string module;
  int32_t worker = 0;
  std::string class_name;
  std::string source_dir;
  std::shared_ptr<weights::device_loader> loader;

  // One update in progress.
  std::string pending_dir;
  std::string path;                  // staged or in_place
  std::vector<at::Tensor> shadows;   // staged: the new weights, one per registry slot
  std::vector<at::Tensor> undo;      // after commit: what was live before
  // GPU modules: pinned host buffers for in-place undo snapshots, allocated at the first in-place commit
  // and reused (pinning 16 GB costs seconds; it must not happen on every update).
  std::vector<at::Tensor> undo_arena;
  bool committed = false;
  bool undo_by_reread = false;       // in place without a snapshot: roll back by re-reading source_dir
  bool rollback_owed = false;        // a rollback of the committed update failed: the next stage finishes it
  std::atomic<uint64_t> commits{0};  // successful commits so far
  std::atomic<uint64_t> decided{0};  // the value of `commits` when the last decision was recorded
  std::atomic<bool> lose_decision{false};  // test builds: the next decision does not reach this module
  std::string problem;               // a replacement could not undo its predecessor's update: weights unknown
  uint64_t update_bytes = 0;

  msg::fault_spec fault;             // test builds: fires once in its phase
  bool force_reread_undo = false;    // test builds: act as if no undo snapshot fits in host memory

  models::tensor_registry& registry() { return pipe->registry(module); }
  // The transformer's layerwise offload when it is on: its blocks' weights live in its host store.
  models::layer_offload* offload() { return module == "transformer" ? pipe->transformer_offload() : nullptr; }
  bool offloaded(size_t slot) {
    auto* off = offload();
    return off && off->offloaded(slot);
  }
};

std::shared_ptr<module_state> make_module_state(std::shared_ptr<pipeline::flux2_klein_pipeline> pipe, std::string module,
                                                int32_t worker, std::string class_name, std::string source_dir,
                                                std::shared_ptr<weights::device_loader> loader) {
  auto s = std::make_shared<module_state>();
  s->pipe = std::move(pipe);
  s->module = std::move(module);
  s->worker = worker;
  s->class_name = std::move(class_name);
  s->source_dir = std::move(source_dir);
  s->loader = std::move(loader);
  return s;
}

void mark_decided(module_state& state) {
  if (state.lose_decision.exchange(false)) return;  // test builds only (fault "decide"/"lost")
  state.decided = state.commits.load();
}

namespace {
// Whether the committed update this state holds was decided by its transaction (every participant
// committed) and no rollback of it is owed. Each commit gets its own number, so a later commit that was
// not decided never matches an earlier decision.
bool holds_decided_commit(const module_state& st) {
  return st.committed && !st.rollback_owed && st.commits > 0 && st.decided == st.commits;
}
}  // namespace

bool fault_injection_compiled() {
#ifdef REFIT_FAULT_INJECTION
  return true;
#else
  return false;
#endif
}

namespace {

using clock = std::chrono::steady_clock;
double since(clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); }

// The tensors that hold the module's weights, one per registry slot: the host store's for offloaded
// blocks (what an update writes and the checksum covers), the model's members for the rest.
std::vector<at::Tensor> live_tensors(module_state& st) {
  auto* off = st.offload();
  const auto& slots = st.registry().slots();
  std::vector<at::Tensor> out;
  out.reserve(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) out.push_back(off && off->offloaded(i) ? off->host_tensor(i) : *slots[i].tensor);
  return out;
}

uint64_t tensors_bytes(const std::vector<at::Tensor>& ts) {
  uint64_t b = 0;
  for (const auto& t : ts)
    if (t.defined()) b += t.nbytes();
  return b;
}

// Host tensors shaped like `like`, for undo snapshots: device tensors get page-locked memory (one
// exact-size allocation per dtype, sliced), host tensors (offloaded blocks) plain memory.
std::vector<at::Tensor> make_undo_arena(const std::vector<at::Tensor>& like) {
  std::map<c10::ScalarType, int64_t> total, used;
  for (const auto& t : like)
    if (t.is_cuda()) total[t.scalar_type()] += t.numel();
  std::map<c10::ScalarType, at::Tensor> base;
  for (const auto& [dt, numel] : total) base[dt] = weights::pinned_host_tensor(numel, dt);
  std::vector<at::Tensor> out;
  for (const auto& t : like) {
    if (!t.is_cuda()) {
      out.push_back(at::empty(t.sizes(), t.options().device(at::kCPU)));
      continue;
    }
    int64_t& offset = used[t.scalar_type()];
    out.push_back(base.at(t.scalar_type()).narrow(0, offset, t.numel()).view(t.sizes()));
    offset += t.numel();
  }
  return out;
}

// Host memory that can still be allocated without swapping.
uint64_t available_host_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

// Whether shadow copies of `bytes` fit next to the live weights on the module's device, with a margin.
bool shadows_fit(const module_state& st, uint64_t bytes) {
  const at::Device device = st.pipe->placement().device;
  const uint64_t margin = 1ull << 30;
#ifdef REFIT_TORCH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDAGuard guard(device);
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return false;
    return bytes + margin <= free_bytes;
  }
#endif
  return device.is_cpu() && bytes + margin <= available_host_bytes();
}

weights::host_load_options load_options(const models::placement& where) {
  weights::host_load_options o;
  switch (where.float_dtype) {
    case at::kBFloat16: o.float_dtype = weights::dtype::BF16; break;
    case at::kHalf: o.float_dtype = weights::dtype::F16; break;
    default: o.float_dtype = weights::dtype::F32; break;
  }
  return o;
}

// Reads the module's checkpoint into `dst` (one tensor per registry slot, same shapes and dtypes; host
// tensors for offloaded blocks, device tensors for the rest).
void read_weights(module_state& st, const std::string& dir, const std::vector<at::Tensor>& dst) {
  auto w = weights::open_module_dir(st.module, dir);
  models::validate_against(st.registry(), w);
  const auto& where = st.pipe->placement();
  const auto& slots = st.registry().slots();
  weights::named_tensors named, host_named;
  for (size_t i = 0; i < slots.size(); ++i) (dst[i].device().is_cpu() ? host_named : named).emplace_back(slots[i].name, dst[i]);
  if (!host_named.empty()) {
    auto t0 = clock::now();
    weights::read_into(w, host_named, load_options(where));
    if (st.offload()) {
      uint64_t bytes = 0;
      for (const auto& [name, t] : host_named) bytes += t.nbytes();
      const double s = since(t0);
      spdlog::info("module {} (worker {}): read {:.1f} MB into the offload host store in {:.3f} s ({:.2f} GB/s)", st.module, st.worker,
                   bytes / 1e6, s, s > 0 ? bytes / s / 1e9 : 0.0);
    }
  }
  if (named.empty()) return;
  if (st.loader) {
    auto stats = st.loader->read_into(w, named, load_options(where));
    spdlog::info("module {} (worker {}): read {:.1f} MB to {} in {:.3f} s ({:.2f} GB/s)", st.module, st.worker, stats.bytes / 1e6,
                 where.device.str(), stats.seconds, stats.seconds > 0 ? stats.bytes / stats.seconds / 1e9 : 0.0);
    return;
  }
  auto host = weights::load_to_host(w, load_options(where));
  std::map<std::string, at::Tensor> by_name(host.begin(), host.end());
  for (auto& [name, t] : named) t.copy_(by_name.at(name), /*non_blocking=*/false);
}

msg::module_report report(const module_state& st, const char* path, uint64_t bytes, double seconds, const std::string& dir) {
  msg::module_report r;
  r.module = st.module;
  r.worker = st.worker;
  r.tensors = st.pipe ? const_cast<module_state&>(st).registry().slots().size() : 0;
  r.bytes = bytes;
  r.seconds = seconds;
  r.path = path;
  r.source_dir = dir;
  return r;
}

// Forgets the update in progress: shadows, undo record, commit flags, its folder.
void end_update(module_state& st) {
  st.undo.clear();
  st.shadows.clear();
  st.committed = false;
  st.undo_by_reread = false;
  st.rollback_owed = false;
  st.pending_dir.clear();
}

// Puts back what was live before commit. Returns how it was done.
const char* restore(module_state& st) {
  auto& slots = st.registry().slots();
  auto* off = st.offload();
  const char* how = st.path == "staged" ? "staged" : "in_place";
  if (st.committed) {
    if (st.path == "staged") {
      for (size_t i = 0; i < slots.size(); ++i)
        if (!st.offloaded(i)) *slots[i].tensor = st.undo[i];
      if (off) off->swap_stores();  // the previous host store is live again, and so are its resident blocks
    } else {
      if (off) off->quiesce();
      const std::vector<at::Tensor> live = live_tensors(st);
      try {
        if (st.undo_by_reread) {
          read_weights(st, st.source_dir, live);
          how = "reread";
        } else {
          for (size_t i = 0; i < slots.size(); ++i) live[i].copy_(st.undo[i]);
        }
      } catch (...) {
        if (off) off->refresh_resident();  // the device copies follow the host store, whatever it now holds
        throw;
      }
      if (off) off->refresh_resident();
    }
  }
  st.problem.clear();
  end_update(st);
  return how;
}

// Makes the committed update permanent: the undo record goes, the new folder becomes the source.
void finalize_state(module_state& st) {
  if (st.committed) {
    if (!st.pending_dir.empty()) st.source_dir = st.pending_dir;
    st.problem.clear();  // every weight was just written from a known checkpoint
  }
  end_update(st);
}

// Test builds: fail the phase as the fault says (once).
caf::error maybe_fault(module_state& st, const char* phase, caf::scheduled_actor* self) {
#ifdef REFIT_FAULT_INJECTION
  if (st.fault.phase != phase) return {};
  const std::string kind = st.fault.kind;
  st.fault = {};
  const std::string what = "injected fault (" + kind + ") in module '" + st.module + "' phase '" + phase + "'";
  if (kind == "throw") throw std::runtime_error(what);
  if (kind == "die") {
    // The reply goes out before the actor's down message: widen that window as a loaded machine may,
    // so that nothing can rely on the down message arriving first.
    self->attach_functor([](const caf::error&) { std::this_thread::sleep_for(std::chrono::milliseconds(30)); });
    self->quit(msg::make_error(refit_errc::phase_failed, what));
    return msg::make_error(refit_errc::phase_failed, what);
  }
  return msg::make_error(refit_errc::phase_failed, what);
#else
  (void)st, (void)phase, (void)self;
  return {};
#endif
}

// Runs a phase's body, turning exceptions into error replies that name module and phase.
template <class F>
caf::result<msg::module_report> guarded(module_state& st, const char* phase, F&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    return msg::make_error(refit_errc::phase_failed,
                           "module '" + st.module + "' (worker " + std::to_string(st.worker) + ") phase '" + phase + "': " + e.what());
  }
}

}  // namespace

msg::module_actor spawn_module_actor(caf::actor_system& sys, std::shared_ptr<module_state> state) {
  return sys.spawn<caf::detached>([state](msg::module_actor::pointer self) -> msg::module_actor::behavior_type {
    module_state& st = *state;
    bool kept_decided = false;  // this actor kept its predecessor's decided commit (reported by info)
    if (holds_decided_commit(st)) {
      // The predecessor died after its update was decided: keep the new weights, drop the undo record.
      spdlog::warn("module {} (worker {}): respawned actor kept the decided update from {}", st.module, st.worker, st.pending_dir);
      finalize_state(st);
      kept_decided = true;
    } else if (st.committed || !st.shadows.empty()) {
      c10::InferenceMode inference;
      try {
        const char* how = restore(st);
        spdlog::warn("module {} (worker {}): respawned actor undid an unfinished update ({})", st.module, st.worker, how);
      } catch (const std::exception& e) {
        st.problem = std::string("its actor died during an update and the replacement could not undo it: ") + e.what();
        spdlog::error("module {} (worker {}): respawned actor could not undo an unfinished update: {}", st.module, st.worker, e.what());
      }
    }
    return {
        [self, state](msg::validate_atom, const std::string& dir) -> caf::result<msg::module_report> {
          module_state& st = *state;
          return guarded(st, "validate", [&]() -> caf::result<msg::module_report> {
            if (auto err = maybe_fault(st, "validate", self)) return err;
            auto t0 = clock::now();
            auto w = weights::open_module_dir(st.module, dir);
            models::validate_against(st.registry(), w);
            return report(st, "validate", w.total_bytes, since(t0), dir);
          });
        },
        [self, state](msg::stage_atom, const std::string& dir, const std::string& path) -> caf::result<msg::module_report> {
          module_state& st = *state;
          return guarded(st, "stage", [&]() -> caf::result<msg::module_report> {
            if (auto err = maybe_fault(st, "stage", self)) return err;
            c10::InferenceMode inference;
            auto t0 = clock::now();
            if (holds_decided_commit(st)) {
              // An earlier update committed here and was decided, but its finalize never arrived: its weights
              // are what this module serves, so its undo record goes (a rollback of this update must not
              // reach back past it).
              spdlog::warn("module {} (worker {}): an earlier update from {} was decided but not finalized; keeping its weights",
                           st.module, st.worker, st.pending_dir);
              finalize_state(st);
            } else if (st.committed) {
              // An earlier update that was not decided (or whose rollback failed here) is still in place:
              // finish undoing it first.
              const char* how = restore(st);
              spdlog::warn("module {} (worker {}): undid an earlier update that was never decided ({})", st.module, st.worker, how);
            }
            st.shadows.clear();
            st.pending_dir = dir;
            const std::vector<at::Tensor> live = live_tensors(st);
            const uint64_t bytes = tensors_bytes(live);
            // Offloaded blocks are staged into the offload's second host store (kept for later updates
            // once allocated), the rest into fresh shadows on the device.
            auto* off = st.offload();
            uint64_t shadow_bytes = 0;
            for (size_t i = 0; i < live.size(); ++i)
              if (!st.offloaded(i)) shadow_bytes += live[i].nbytes();
            const bool spare_fits = !off || off->spare_allocated() || off->host_bytes() + (1ull << 30) <= available_host_bytes();
            st.path = path == "auto" ? (shadows_fit(st, shadow_bytes) && spare_fits ? "staged" : "in_place") : path;
            if (st.path == "staged") {
              for (size_t i = 0; i < live.size(); ++i)
                st.shadows.push_back(st.offloaded(i) ? off->spare_tensor(i) : at::empty_like(live[i]));
              try {
                read_weights(st, dir, st.shadows);
              } catch (...) {
                st.shadows.clear();
                throw;
              }
            }
            st.update_bytes = bytes;
            return report(st, st.path.c_str(), st.path == "staged" ? bytes : 0, since(t0), dir);
          });
        },
        [self, state](msg::commit_atom) -> caf::result<msg::module_report> {
          module_state& st = *state;
          return guarded(st, "commit", [&]() -> caf::result<msg::module_report> {
            if (auto err = maybe_fault(st, "commit", self)) return err;
            c10::InferenceMode inference;
            auto t0 = clock::now();
            auto& slots = st.registry().slots();
            if (st.path == "staged") {
              if (st.shadows.size() != slots.size()) throw std::logic_error("commit without staged weights");
              st.undo.clear();
              auto* off = st.offload();
              std::vector<at::Tensor> undo;
              for (size_t i = 0; i < slots.size(); ++i)  // offloaded: the live store, second store after the swap
                undo.push_back(st.offloaded(i) ? off->host_tensor(i) : *slots[i].tensor);
              // The one step that can fail comes first and is all or nothing; the rest cannot fail.
              if (off) off->swap_stores();  // the staged host store goes live; resident blocks are rewritten
              for (size_t i = 0; i < slots.size(); ++i)
                if (!st.offloaded(i)) *slots[i].tensor = st.shadows[i];  // a swap of storage, not a copy
              st.undo = std::move(undo);
              st.shadows.clear();
              st.committed = true;
              ++st.commits;
              return report(st, "staged", st.update_bytes, since(t0), st.pending_dir);
            }
            // In place: keep what is live in host memory first (or, when that does not fit, plan to
            // re-read the previous checkpoint), then read the new weights over the live tensors.
            auto* off = st.offload();
            if (off) off->quiesce();  // no block copy may read the host store while it is rewritten
            const std::vector<at::Tensor> live = live_tensors(st);
            const uint64_t bytes = tensors_bytes(live);
            st.undo.clear();
            st.undo_by_reread = st.force_reread_undo || bytes + (1ull << 30) > available_host_bytes();
            if (!st.undo_by_reread) {
              const bool on_gpu = !st.pipe->placement().device.is_cpu();
              if (on_gpu && st.undo_arena.size() != slots.size()) st.undo_arena = make_undo_arena(live);
              for (size_t i = 0; i < slots.size(); ++i) {
                at::Tensor host = on_gpu ? st.undo_arena[i] : at::empty_like(live[i]);
                host.copy_(live[i]);
                st.undo.push_back(host);
              }
            }
            st.committed = true;
            ++st.commits;  // this commit's own number: a half-written one can never match an earlier decision
            try {
              read_weights(st, st.pending_dir, live);
              if (off) off->refresh_resident();
            } catch (...) {
              restore(st);  // a half-written module must not stay live
              throw;
            }
            return report(st, st.undo_by_reread ? "in_place(reread-undo)" : "in_place", bytes, since(t0), st.pending_dir);
          });
        },
        [self, state](msg::rollback_atom) -> caf::result<msg::module_report> {
          module_state& st = *state;
          st.rollback_owed = st.committed;  // cleared by restore() when it succeeds
          return guarded(st, "rollback", [&]() -> caf::result<msg::module_report> {
            if (auto err = maybe_fault(st, "rollback", self)) return err;
            c10::InferenceMode inference;
            auto t0 = clock::now();
            const uint64_t bytes = st.update_bytes;
            const char* how = restore(st);
            return report(st, how, bytes, since(t0), st.source_dir);
          });
        },
        [self, state](msg::finalize_atom) -> caf::result<msg::module_report> {
          module_state& st = *state;
          return guarded(st, "finalize", [&]() -> caf::result<msg::module_report> {
            if (auto err = maybe_fault(st, "finalize", self)) return err;
            auto t0 = clock::now();
            finalize_state(st);
            return report(st, st.path.c_str(), st.update_bytes, since(t0), st.source_dir);
          });
        },
        [state](msg::discard_atom) -> caf::result<msg::module_report> {
          module_state& st = *state;
          return guarded(st, "discard", [&]() -> caf::result<msg::module_report> {
            c10::InferenceMode inference;
            auto t0 = clock::now();
            const char* how = restore(st);
            return report(st, how, 0, since(t0), st.source_dir);
          });
        },
        [state](msg::checksum_atom) -> caf::result<std::string> {
          module_state& st = *state;
          try {
            c10::InferenceMode inference;
            auto& slots = st.registry().slots();
            const std::vector<at::Tensor> live = live_tensors(st);
            std::vector<weights::tensor_digest_record> records(slots.size());
            weights::parallel_for_each(slots.size(), 0, [&](size_t i) {
              at::Tensor t = live[i].to(at::kCPU).contiguous();
              weights::sha256 h;
              h.update({static_cast<const std::byte*>(t.data_ptr()), t.nbytes()});
              records[i] = {slots[i].name, weights::from_scalar_type(t.scalar_type()), t.sizes().vec(), h.finish()};
            });
            return weights::combine_module_checksum(std::move(records));
          } catch (const std::exception& e) {
            return msg::make_error(refit_errc::phase_failed, "module '" + st.module + "' checksum: " + e.what());
          }
        },
        [state, kept_decided](msg::info_atom) -> msg::module_info {
          module_state& st = *state;
          msg::module_info i;
          i.name = st.module;
          i.class_name = st.class_name;
          const auto dt = st.pipe->placement().float_dtype;
          i.dtype = dt == at::kBFloat16 ? "bf16" : dt == at::kHalf ? "fp16" : dt == at::kFloat ? "fp32" : c10::toString(dt);
          i.device = st.pipe->placement().device.str();
          i.worker = st.worker;
          i.tensors = st.registry().slots().size();
          i.bytes = tensors_bytes(live_tensors(st));
          i.source_dir = st.source_dir;
          i.undo_bytes = tensors_bytes(st.undo);
          i.shadow_bytes = tensors_bytes(st.shadows);
          i.problem = st.problem;
          i.kept_decided = kept_decided;
          return i;
        },
        [state](msg::fault_atom, const msg::fault_spec& f) -> caf::result<bool> {
          if (!fault_injection_compiled())
            return msg::make_error(refit_errc::fault_injection_unavailable, "this build does not inject faults");
          // phase "snapshot", kind "nomem": the next in-place commit finds no room for its undo snapshot.
          if (f.phase == "snapshot") state->force_reread_undo = f.kind == "nomem";
          // phase "decide", kind "lost": the worker's record of the next decision does not reach this module.
          else if (f.phase == "decide") state->lose_decision = f.kind == "lost";
          else state->fault = f;
          return true;
        },
    };
  });
}

}  // namespace refit::actors
