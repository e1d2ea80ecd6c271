// How much memory an update may still take: the probes behind the staged-or-in-place choice and the
// undo snapshot, and the host buffers that snapshot lives in.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <vector>

namespace refit::update {

// Room kept free beside any allocation an update makes.
inline constexpr uint64_t memory_margin = 1ull << 30;

// Host memory that can still be allocated without swapping (MemAvailable).
uint64_t available_host_bytes();
// Whether `bytes` more fit on `device` beside what it holds, with memory_margin to spare: free device
// memory on a GPU, available host memory on the CPU.
bool fits_on(const c10::Device& device, uint64_t bytes);
// Host tensors shaped like `like`, for undo snapshots: device tensors get page-locked memory (one
// exact-size allocation per dtype, sliced), host tensors (offloaded blocks) plain memory.
std::vector<at::Tensor> make_undo_arena(const std::vector<at::Tensor>& like);
// Device memory in use as the driver reports it (total - free; 0 on the CPU).
uint64_t device_used_bytes(const c10::Device& device);
// Returns the caching allocator's unused device memory to the driver (a GPU; nothing on the CPU).
void release_cached_device_memory(const c10::Device& device);

}  // namespace refit::update
