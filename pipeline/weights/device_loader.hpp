// The GPU fast path for reading weights: a pinned staging ring allocated once per device, reader threads
// (pread) filling ring slots while host-to-device copies of earlier slots run on a dedicated stream,
// conversion to the module dtype on the GPU, and one synchronisation per read. Files that are mostly not
// in the page cache are read with O_DIRECT (aligned reads straight into the pinned slots), so a cold
// read runs at the device's rate instead of through the page cache.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <mutex>

#include "pipeline/weights/host_loader.hpp"
#include "pipeline/weights/staging_geometry.hpp"

namespace refit::weights {

struct device_read_stats {
  uint64_t bytes = 0;
  double seconds = 0;
  uint64_t chunks = 0;
  uint64_t direct_bytes = 0;  // read with O_DIRECT, from files that were not in the page cache
};

// A 1-D CPU tensor of `numel` elements in page-locked memory of exactly that size, freed with the tensor:
// torch's pinned allocator rounds every allocation up to a power of two, up to twice the memory for large
// weights. Huge-page memory touched in parallel and registered with CUDA (8x faster to pin than
// cudaHostAlloc, which is the fallback). Throws when this build has no CUDA or the allocation fails.
at::Tensor pinned_host_tensor(int64_t numel, c10::ScalarType dtype);

class device_loader {
 public:
  // Allocates `slots` pinned buffers of `slot_bytes` each for CUDA device `device_index`. Slots outnumber
  // reader threads two to one, so every thread can read the next chunk while its last one is copied.
  // The slots' copies alternate over `copy_streams` streams.
  device_loader(int device_index, uint64_t slot_bytes, unsigned slots, unsigned threads, unsigned copy_streams = 1);
  // The ring sized from the last-level cache (staging_geometry.hpp).
  device_loader(int device_index, const staging_geometry& g)
      : device_loader(device_index, g.slot_bytes, g.slots, g.threads, g.copy_streams) {}
  explicit device_loader(int device_index) : device_loader(device_index, choose_staging_geometry()) {}
  ~device_loader();
  device_loader(const device_loader&) = delete;
  device_loader& operator=(const device_loader&) = delete;

  // Reads every tensor of `weights` into the matching device tensors of `destinations` (same names and
  // shapes; dtype = the held dtype under options.float_dtype). Returns after the data is on the device.
  // Reads of one loader share the ring one after another (the PCIe link is the bottleneck anyway), but without
  // a gap: the next read's threads start as soon as this one's last chunk is read, while its copies drain.
  // `replicas` (optional, one list per destination): more destinations of the same shape and dtype on other CUDA
  // devices of this process: each chunk, once copied to its destination, goes on to them device to device (NVLink),
  // overlapped with the next chunks; the file is read and crosses the host link once.
  device_read_stats read_into(const module_weights& weights, const named_tensors& destinations, const host_load_options& options,
                              const std::vector<std::vector<at::Tensor>>* replicas = nullptr);

  // Whether this build can drive CUDA devices.
  static bool available();

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
  std::mutex busy_;
};

}  // namespace refit::weights
