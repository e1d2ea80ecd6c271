#include "pipeline/update/memory.hpp"

#include <ATen/ATen.h>

#ifdef REFIT_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

#include <fstream>
#include <map>
#include <string>

#include "pipeline/weights/device_loader.hpp"

namespace refit::update {

uint64_t available_host_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  uint64_t kb = 0;
  while (in >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

bool fits_on(const c10::Device& device, uint64_t bytes) {
#ifdef REFIT_TORCH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDAGuard guard(device);
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return false;
    return bytes + memory_margin <= free_bytes;
  }
#endif
  return device.is_cpu() && bytes + memory_margin <= available_host_bytes();
}

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

uint64_t device_used_bytes(const c10::Device& device) {
#ifdef REFIT_TORCH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDAGuard guard(device);
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return 0;
    return total - free_bytes;
  }
#endif
  (void)device;
  return 0;
}

void release_cached_device_memory(const c10::Device& device) {
#ifdef REFIT_TORCH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#else
  (void)device;
#endif
}

}  // namespace refit::update
