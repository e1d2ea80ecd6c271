// The update core of one module of one worker: the slot lifecycle of a transactional weight update,
// in plain C++ (the module actor is only its message adapter, and tests drive it without CAF).
//
//   stage   staged: the source fills shadow buffers (layerwise-offloaded slots: the offload's second host
//           store), or hands over values it already holds as the module would (adopt), while generation
//           continues on the live tensors. in place: only plans.
//   commit  staged: swap storage (the old tensors become the undo record). in place: snapshot the live
//           values into pinned host memory (or, without room, plan to re-read their previous source),
//           then the source fills the live tensors.
//   restore (rollback, discard, or a replacement actor's start-up) puts back what was live before commit.
//   finalize the update stands: undo and shadows go, the slots' origin becomes the new source.
//
// The decision rule: every commit gets its own number; the transaction records that an update is
// decided (every participant committed) with mark_decided. An actor that starts on this state
// (on_actor_start) keeps a decided commit and undoes an undecided one, so a module never goes back to
// old weights after the decision, and never keeps half an update before it.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <map>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/update/weight_source.hpp"
#include "pipeline/weights/checksum.hpp"

namespace refit::pipeline {
class diffusion_pipeline;
}
namespace refit::models {
class layer_offload;
class tensor_registry;
}  // namespace refit::models

namespace refit::update {

// How an update asks the new weights to be written.
enum class requested_path : uint8_t { auto_select, staged, in_place };
// How a phase wrote or restored the weights. in_place_reread_undo: in place without an undo snapshot
// (restore re-reads the previous source); reread: a restore that did so.
enum class write_path : uint8_t { none, staged, in_place, in_place_reread_undo, reread };

struct phase_report {
  write_path path = write_path::none;
  uint64_t tensors = 0;  // slots the phase concerned
  uint64_t bytes = 0;
  double seconds = 0;
  std::string source;    // the update's source (validate, stage, commit), or what the module holds now
};

struct module_status {
  std::string module, class_name, dtype, device, source, problem;
  int32_t worker = 0;
  uint64_t tensors = 0, bytes = 0, undo_bytes = 0, shadow_bytes = 0;
  std::vector<adapter_info> adapters;  // LoRA adapters merged into the held values, in the order applied
  uint64_t adapter_tensors = 0;        // slots holding merged values
};

class module_updater {
 public:
  // `loaded_from`: where the weights the pipeline holds now came from (every slot). `loader`: the
  // worker's GPU fast path (pinned staging ring), shared by its modules; null on CPU.
  module_updater(std::shared_ptr<pipeline::diffusion_pipeline> pipe, std::string module, int32_t worker,
                 std::shared_ptr<module_source> loaded_from, std::shared_ptr<weights::device_loader> loader = nullptr);
  ~module_updater();
  module_updater(const module_updater&) = delete;
  module_updater& operator=(const module_updater&) = delete;

  const std::string& module() const { return module_; }
  c10::Device device() const;
  int32_t worker() const { return worker_; }

  // The phases, in the order a transaction runs them. Each throws on failure with a message that
  // names the tensor or file; the caller adds module and phase.
  phase_report validate(module_source& source);
  // `check_finite`: the new values must hold no NaN or infinity, checked on the device where they are
  // written: staged, before stage returns; in place, during commit (which then restores the module and
  // fails), so that non-finite weights are never served. The message names the first offending tensor.
  phase_report stage(std::shared_ptr<module_source> source, requested_path path, bool check_finite = false);
  phase_report commit();
  // A rollback was asked for: if it does not complete, the next stage finishes it (and never treats
  // the commit as decided). Call before rollback(), which may then fail.
  void rollback_requested();
  phase_report rollback();
  phase_report finalize();
  phase_report discard();

  // An actor starts on this state (a replacement of one that died): keeps the update in progress when
  // it was decided (returns true), else undoes it. A restore that fails leaves `problem` set.
  bool on_actor_start();
  // Every participant of the update committed; safe from any thread.
  void mark_decided();

  // The module checksum (DESIGN.md section 4) of the values held (the host store for offloaded slots), in
  // SGLang's format (parameters only) or refit's (every parameter and buffer).
  std::string checksum(weights::checksum_format format) const;
  // SGLang's per-tensor hash (its update_weights_from_tensor_checker): SHA-256 of str(dtype) ("torch.float32"),
  // repr(tuple(shape)) and the raw bytes, for each of `names` the module holds (absent names are left out).
  std::map<std::string, std::string> tensor_sha256(const std::vector<std::string>& names) const;
  module_status status() const;
  // Read once per host: the values a staged, uncommitted update from `origin` holds for `slots` (its shadows on
  // this module's device), for the same module on another worker of this process, which copies them instead of
  // reading the files again. nullopt when there are none (nothing staged, staged in place, another origin, a slot
  // not planned or offloaded). Only while this module's actor waits between stage and commit (the transaction
  // stages the copies after this stage replied and commits after every stage).
  std::optional<std::vector<at::Tensor>> staged_values(const std::vector<size_t>& slots, const std::string& origin) const;
  // The replica of `slot` a staged, uncommitted update from `origin` made on `worker`'s device (a checkpoint read
  // fanned out over the GPUs' host links), handed over once; undefined when there is none.
  at::Tensor take_staged_replica(size_t slot, const std::string& origin, int32_t worker) const;
  // Where each registry slot's values came from (a LoRA merge reads the base of earlier merges from them).
  const std::vector<std::shared_ptr<module_source>>& origins() const { return origins_; }

  // SGLang's release/resume_memory_occupation: the device weights move to pinned host memory (the undo arena,
  // kept once pinned) and the slots point there, so the device memory can go back to the driver; resume
  // copies them to fresh device tensors. Only between updates (throws while one is in progress); both are
  // idempotent (nothing moves the second time). A CPU module has nothing to move.
  phase_report release_memory();
  phase_report resume_memory();
  bool memory_released() const { return released_; }

  // Test builds: in-place commits find no room for the undo snapshot; the next decision is lost.
  void simulate_no_room_for_undo(bool on) { force_reread_undo_ = on; }
  void lose_next_decision(bool lose) { lose_decision_ = lose; }

 private:
  struct pending;
  module_context context() const;
  models::tensor_registry& registry() const;
  models::layer_offload* offload() const;
  bool offloaded(size_t slot) const;
  std::vector<at::Tensor> held(const std::vector<size_t>& slots) const;
  bool holds_decided_commit() const;
  write_path restore();
  void refill_from_origins(const std::vector<size_t>& slots, const std::vector<at::Tensor>& destinations);
  void finalize_pending();
  void end_update();
  std::string source_of() const;

  std::shared_ptr<pipeline::diffusion_pipeline> pipe_;
  std::string module_, class_name_;
  int32_t worker_ = 0;
  std::shared_ptr<weights::device_loader> loader_;
  std::vector<std::shared_ptr<module_source>> origins_;  // per registry slot: where its values came from
  std::unique_ptr<pending> pending_;                     // the update in progress
  write_path path_ = write_path::none;                   // the latest update's path
  uint64_t tensors_ = 0, bytes_ = 0;                     // and its size
  // GPU modules: pinned host buffers for in-place undo snapshots, allocated at the first in-place commit
  // and reused (pinning 16 GB costs seconds; it must not happen on every update).
  std::vector<at::Tensor> undo_arena_;
  bool released_ = false;              // release_memory: the slots below hold their values in undo_arena_
  std::vector<size_t> released_slots_;
  std::atomic<uint64_t> commits_{0};  // successful commits so far
  std::atomic<uint64_t> decided_{0};  // the value of commits_ when the last decision was recorded
  std::atomic<bool> lose_decision_{false};
  bool force_reread_undo_ = false;
  std::string problem_;  // a replacement could not undo its predecessor's update: the weights are unknown
};

}  // namespace refit::update
