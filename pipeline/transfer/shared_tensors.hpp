// Opening what a colocated trainer shares (SGLang's update_weights_from_tensor): torch's shared-memory
// segments (the "file_system" sharing strategy, CPU) and CUDA IPC allocations, as views a received_source
// reads. Every view is checked against its storage before it exists, and only torch's own segment names
// are opened (shm_open, never a path), read-only, so a request cannot make refit read an arbitrary file or
// past a segment.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace refit::transfer {

class received_weights;

struct shared_segment {
  bool cuda = false;
  std::string handle;         // shm: "/torch_<pid>_<n>_<n>"; cuda: a cudaIpcMemHandle_t (64 bytes)
  uint64_t size_bytes = 0;
  uint64_t offset_bytes = 0;  // cuda: where the storage starts in the allocation
  std::string device;         // cuda: the producer's GPU, "GPU-<uuid>" or an ordinal
  std::string event_handle;   // cuda: a cudaIpcEventHandle_t to wait for, or empty
};

struct shared_view {
  std::string module, name;
  c10::ScalarType dtype = c10::ScalarType::Float;
  std::vector<int64_t> shape, stride;
  uint64_t offset_bytes = 0;
  size_t segment = 0;
};

// Opens the segments (on `device` for CUDA IPC) and makes the views, as a borrowed received set. Throws
// std::invalid_argument naming the tensor or segment: a name that is not torch's, a segment that does not
// exist, is not a regular file or is smaller than announced, a view past its storage, IPC from another GPU
// or on a CPU worker. `consume`: this opener takes over the pickle's reference to each shared-memory segment
// (exactly one opener per payload must), dropped when the set goes.
std::shared_ptr<received_weights> open_shared(const std::vector<shared_segment>& segments, const std::vector<shared_view>& views,
                                              const c10::Device& device, const std::string& origin, bool consume);

// This worker's GPU as SGLang names it (torch.cuda.get_device_properties(i).uuid): "GPU-xxxxxxxx-...", or ""
// on a CPU.
std::string gpu_uuid(const c10::Device& device);

}  // namespace refit::transfer
