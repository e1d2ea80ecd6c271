// Layerwise offload of a model's repeated blocks (SGLang's --dit-layerwise-offload): every block's
// weights live in host memory, one consolidated buffer per (block, dtype) — pinned when the model runs
// on a GPU — and the block's members hold no device weights until the block is prefetched into one of
// prefetch_size + 1 device slots, on a copy stream, ahead of its use; after use they are released
// again. Parameters outside the blocks stay resident as usual.
//
// Weight updates go to the host store: staged ones into a second host store that swap_stores() makes
// live; in-place ones into the live store followed by refresh_resident(). Either way every block that
// is resident on the device at that moment is rewritten in its slot, so no extra device memory is used.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "pipeline/models/tensor_registry.hpp"

namespace refit::models {

struct layer_offload_info {
  int64_t layers = 0;
  int64_t prefetch_size = 0;
  int64_t slots = 0;              // device slots: prefetch_size + 1, at most one per block
  std::vector<int64_t> resident;  // blocks now in a device slot, in slot order
  uint64_t host_bytes = 0;        // the live host store
  uint64_t spare_host_bytes = 0;  // the second host store (0 until the first staged update)
  uint64_t device_bytes = 0;      // the device slots
  uint64_t prefetches = 0;        // block copies host -> device issued for compute
  uint64_t prefetched_bytes = 0;  // their bytes
  uint64_t refreshes = 0;         // resident blocks rewritten by weight updates
};

class layer_offload {
 public:
  // `layer_prefixes`: the blocks in execution order, as registry name prefixes ("transformer_blocks.0.").
  // `prefetch_size`: blocks copied ahead of the one computing; a whole number >= 1, or a fraction (0, 1)
  // of the blocks (rounded up); more than blocks - 1 keeps every block resident.
  // Allocates the host store (values undefined until loaded through host_tensor) and the device slots,
  // and points every block member at an empty placeholder.
  layer_offload(tensor_registry& registry, const std::vector<std::string>& layer_prefixes, at::Device device,
                c10::ScalarType float_dtype, double prefetch_size);
  ~layer_offload();
  layer_offload(const layer_offload&) = delete;
  layer_offload& operator=(const layer_offload&) = delete;

  int64_t layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t prefetch_size() const { return prefetch_; }
  // Whether registry slot `slot` lives in the host store.
  bool offloaded(size_t slot) const { return slot < slot_layer_.size() && slot_layer_[slot] >= 0; }
  // The slot's tensor in the live host store (CPU, contiguous); undefined for slots not offloaded.
  at::Tensor host_tensor(size_t slot) const;
  // The same in the second host store, allocated on the first call (pinned on a GPU: seconds for GBs).
  at::Tensor spare_tensor(size_t slot);
  bool spare_allocated() const;
  uint64_t host_bytes() const { return host_bytes_; }

  // Compute path, called by the model around block `layer` (in execution order, wrapping around).
  // acquire: the block's members point at its device slot once the copy is done (the compute stream
  // waits for it); release: members back to placeholders, the slot goes to the next block to prefetch.
  void acquire(int64_t layer);
  void release(int64_t layer);
  // After an exception inside a block: drop every slot and prefetch from block 0 again.
  void recover();

  // Update path (generation is drained). The second store becomes the live one and every resident
  // block is re-copied from it; calling it again swaps back (rollback). All or nothing: when it throws,
  // the previous store is still live.
  void swap_stores();
  // Re-copies every resident block from the live host store (after it was written in place). The copies
  // are queued, not waited for: compute waits for them per block.
  void refresh_resident();
  // Waits until no copy reads the host stores, so they may be written. Every writer calls it first.
  void quiesce();

  layer_offload_info info() const;

 private:
  struct member {
    size_t slot;              // registry slot
    at::Tensor* tensor;       // the model member
    c10::ScalarType dtype;
    int64_t offset, numel;    // elements into the (layer, dtype) buffer
    std::vector<int64_t> shape;
  };
  struct layer {
    std::vector<member> members;
    std::map<c10::ScalarType, int64_t> numel;  // per dtype, aligned
  };
  struct store {
    std::vector<std::map<c10::ScalarType, at::Tensor>> buffers;  // per layer and dtype, 1-D
  };
  struct device_slot;

  store make_store(bool pinned) const;
  void fill_locked();                          // prefetch ahead until every device slot is taken
  void copy_into_slot_locked(int64_t layer, size_t slot);
  void point_members_locked(int64_t layer, size_t slot);
  void park_members_locked(int64_t layer);
  void drop_resident_locked();  // every block not computing leaves its slot

  mutable std::mutex mu_;
  at::Device device_;
  int64_t prefetch_ = 1;
  std::vector<layer> layers_;
  std::vector<int> slot_layer_;  // registry slot -> block index, -1 when resident as usual
  std::map<c10::ScalarType, at::Tensor> placeholders_;
  std::map<c10::ScalarType, int64_t> slot_numel_;  // per dtype: the largest block's
  store live_, spare_;
  uint64_t host_bytes_ = 0;
  std::vector<std::unique_ptr<device_slot>> slots_;
  std::vector<int> layer_slot_;   // block -> device slot, -1 when not resident
  std::vector<bool> in_use_;      // block acquired and not yet released
  int64_t next_prefetch_ = 0;     // the next block to copy
  uint64_t prefetches_ = 0, prefetched_bytes_ = 0, refreshes_ = 0;
  struct cuda_state;
  std::unique_ptr<cuda_state> cuda_;
};

}  // namespace refit::models
