// A weight source: where the new values of one module come from. The update core (module_updater)
// validates, stages, commits and rolls back the same way whatever the source is; a source only says,
// from metadata, what it will write (plan) and then writes it (fill).
//
// Sources that fit this interface (docs/architecture.md): a checkpoint folder on disk
// (checkpoint_source, the first); tensors a trainer broadcast over a torch.distributed group, received
// into memory first (transfer::received_source: plan from what arrived, fill copies); tensors a
// colocated trainer shares (plan from the handles' metadata; fill copies device to device); LoRA
// adapters merged into the base (lora::lora_source: plan the slots the adapters target; fill writes
// base + Σ scale·B·A computed in fp32 from a kept copy of the base).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "pipeline/models/placement.hpp"

namespace refit::models {
class tensor_registry;
}
namespace refit::weights {
class device_loader;
}

namespace refit::update {

// The module a source writes, and how bytes reach its device.
struct module_context {
  const std::string& module;
  int32_t worker = 0;
  const models::tensor_registry& registry;
  const models::placement& where;
  weights::device_loader* loader = nullptr;  // the worker's GPU fast path; null on CPU
};

// An adapter merged into a module's weights, as a source that holds it reports it.
struct adapter_info {
  std::string nickname, path;
  double strength = 1;
};

// What a source will write: registry slots in ascending order, and the bytes it provides for them.
struct source_plan {
  std::vector<size_t> slots;
  uint64_t bytes = 0;
};

// Where a fill writes, one entry per planned slot in plan order. `destinations` are shadow buffers
// (staged) or the held tensors themselves (in place); `current` holds the values the module holds now
// (the same tensors when in place). Every destination is contiguous, of the slot's shape and held dtype,
// on the device (or in the host store for a layerwise-offloaded slot).
struct fill_target {
  const std::vector<size_t>& slots;
  const std::vector<at::Tensor>& destinations;
  const std::vector<at::Tensor>& current;
};

class module_source {
 public:
  virtual ~module_source() = default;
  // What the values are, for reports, info and messages (a checkpoint: the module's folder).
  virtual std::string origin() const = 0;
  // From metadata alone, before any byte moves: checks that every value the source announces fits the
  // module (name, shape, a dtype it can be converted from) and says which slots it writes. Throws
  // weights::weight_error or std::exception with a message naming the module and tensor.
  virtual source_plan plan(const module_context& module) = 0;
  // Writes the new values of the planned slots. Throws on any failure; the caller restores.
  virtual void fill(const module_context& module, const fill_target& target) = 0;
  // Staged updates: a tensor that already holds the slot's new value exactly as the module would hold it
  // (dtype, shape, device, contiguous, its own storage), which the module may keep instead of a shadow it
  // fills; undefined when there is none (then fill writes the slot). Sources holding their values in
  // memory (a received broadcast) offer it; the default offers nothing.
  virtual at::Tensor adopt(const module_context& module, size_t slot, const at::Tensor& current) {
    (void)module, (void)slot, (void)current;
    return {};
  }
  // The module releases its device memory (release_memory_occupation): device memory the source keeps for
  // later fills moves to host memory; returns the bytes moved.
  virtual uint64_t release_device_memory() { return 0; }
  // The adapters merged into the values this source provides (a LoRA merge), in the order applied.
  virtual std::vector<adapter_info> merged_adapters() const { return {}; }
  // Whether fill may run again for any subset of the slots (to undo an in-place commit by re-reading,
  // or to apply the update again after an actor was replaced). A broadcast received once is not.
  virtual bool repeatable() const = 0;
};

}  // namespace refit::update
