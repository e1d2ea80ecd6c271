#include "pipeline/transfer/shared_tensors.hpp"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <regex>
#include <set>
#include <stdexcept>

#include "pipeline/transfer/received_weights.hpp"

#include <spdlog/spdlog.h>

#ifdef REFIT_WITH_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>
#endif

namespace refit::transfer {

namespace {

std::invalid_argument bad(const std::string& why) { return std::invalid_argument(why); }

// One opened segment; unmapped (or its IPC handle closed) when the last view goes.
struct segment {
  void* base = nullptr;  // the storage's first byte
  uint64_t size = 0;
  std::function<void()> close;
  ~segment() {
    if (close) close();
  }
};

// torch's segments (libshm's ManagedMapAllocator, a RefcountedMapAllocator) start with a 64-byte header whose
// first int counts the references; the storage's bytes follow. A pickle of the storage holds one reference,
// which its consumer takes over: refit drops it when it lets the segment go (`consume`), and unlinks the
// segment when it was the last, as torch's own consumer does, so that updates leave nothing in /dev/shm.
constexpr uint64_t shm_header = 64;

std::shared_ptr<segment> open_shm(const shared_segment& s, bool consume) {
  // torch names its segments "/torch_<pid>_<random>_<counter>" (libshm); nothing else is opened.
  static const std::regex torch_name("/torch_[0-9]{1,10}_[0-9]{1,20}_[0-9]{1,20}");
  if (!std::regex_match(s.handle, torch_name))
    throw bad("shared memory name '" + s.handle + "' is not one torch makes (/torch_<pid>_<n>_<n>); refit opens nothing else");
  // Non-blocking and no links followed, and only a regular file is used (a FIFO or device of that name is not).
  const int fd = shm_open(s.handle.c_str(), O_RDWR | O_NONBLOCK | O_NOFOLLOW, 0);
  if (fd < 0)
    throw bad("shared memory segment '" + s.handle + "' cannot be opened (" + std::strerror(errno) +
              "): the trainer must keep its tensors alive until the reply");
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw bad("shared memory segment '" + s.handle + "' is not a regular shared memory file");
  }
  if (static_cast<uint64_t>(st.st_size) < shm_header || static_cast<uint64_t>(st.st_size) - shm_header < s.size_bytes) {
    ::close(fd);
    throw bad("shared memory segment '" + s.handle + "' holds " + std::to_string(st.st_size) + " bytes, fewer than the " +
              std::to_string(s.size_bytes) + " announced (+" + std::to_string(shm_header) + " of torch's header)");
  }
  const uint64_t mapped = shm_header + s.size_bytes;
  void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) throw bad("shared memory segment '" + s.handle + "' cannot be mapped: " + std::strerror(errno));
  auto seg = std::make_shared<segment>();
  seg->base = static_cast<char*>(p) + shm_header;
  seg->size = s.size_bytes;
  const std::string name = s.handle;
  seg->close = [p, mapped, consume, name] {
    if (consume && __atomic_sub_fetch(static_cast<int*>(p), 1, __ATOMIC_ACQ_REL) == 0) shm_unlink(name.c_str());
    munmap(p, mapped);
  };
  return seg;
}

#ifdef REFIT_WITH_CUDA
void check_cuda(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) throw bad(what + ": " + cudaGetErrorString(e));
}
#endif

#ifdef REFIT_WITH_CUDA
// One IPC allocation, opened once however many storages it holds (CUDA maps a handle once per process).
struct ipc_allocation {
  void* mapped = nullptr;    // where cudaIpcOpenMemHandle mapped the handle
  uint64_t reach = 0;        // bytes from `mapped` to the allocation's end
  int device = 0;
  ~ipc_allocation() {
    cudaSetDevice(device);
    cudaIpcCloseMemHandle(mapped);
  }
};

// torch's caching allocator shares a block as a version byte, a kind byte ('c': cudaMalloc memory, followed by
// the cudaIpcMemHandle_t; 'e': an expandable segment) and the handle; older torch sent the bare handle.
cudaIpcMemHandle_t ipc_handle(const std::string& handle) {
  cudaIpcMemHandle_t h;
  constexpr size_t n = sizeof(cudaIpcMemHandle_t);
  if (handle.size() == n + 2 && handle[1] == 'c') {
    std::memcpy(&h, handle.data() + 2, n);
    return h;
  }
  if (handle.size() == n + 2 && handle[1] == 'e')
    throw bad("the trainer's CUDA allocator uses expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), whose "
              "handles refit does not open; share tensors from cudaMalloc memory");
  if (handle.size() != n) throw bad("a CUDA IPC handle of " + std::to_string(handle.size()) + " bytes is not one torch makes");
  std::memcpy(&h, handle.data(), n);
  return h;
}

std::shared_ptr<ipc_allocation> open_allocation(const std::string& handle, int index) {
  const cudaIpcMemHandle_t h = ipc_handle(handle);
  check_cuda(cudaSetDevice(index), "cudaSetDevice");
  auto a = std::make_shared<ipc_allocation>();
  a->device = index;
  check_cuda(cudaIpcOpenMemHandle(&a->mapped, h, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
  // The allocation's real extent bounds what the views may read: cuMemGetAddressRange, through the runtime's
  // driver entry points (refit does not link libcuda, so that it starts on machines without a GPU driver).
  using range_fn = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault, &found) != cudaSuccess || !fn)
    throw bad("the CUDA driver does not provide cuMemGetAddressRange");
  CUdeviceptr base = 0;
  size_t size = 0;
  if (reinterpret_cast<range_fn>(fn)(&base, &size, reinterpret_cast<CUdeviceptr>(a->mapped)) != CUDA_SUCCESS)
    throw bad("the CUDA IPC allocation's size cannot be read");
  a->reach = base + size - reinterpret_cast<CUdeviceptr>(a->mapped);
  return a;
}
#endif

// What one request has opened over CUDA IPC: each allocation handle once, each event waited for once.
struct ipc_opened {
  std::map<std::string, std::shared_ptr<void>> allocations;
  std::set<std::string> events;
};

std::shared_ptr<segment> open_ipc(const shared_segment& s, const c10::Device& device, ipc_opened& opened) {
  if (!device.is_cuda()) throw bad("a CUDA IPC handle was sent to a worker on " + device.str() + "; send CPU tensors (file_system sharing)");
#ifdef REFIT_WITH_CUDA
  const int index = device.has_index() ? device.index() : 0;
  const std::string own = gpu_uuid(device);
  const bool ordinal = !s.device.empty() && s.device.find_first_not_of("0123456789") == std::string::npos;
  const std::string theirs = ordinal || s.device.rfind("GPU-", 0) == 0 || s.device.rfind("MIG-", 0) == 0 ? s.device : "GPU-" + s.device;
  if (ordinal ? std::stoll(s.device) != index : theirs != own)
    throw bad("the tensors were exported from GPU " + s.device + ", not this worker's (" + own + "); a colocated trainer shares its "
              "own GPU's memory");
  auto& slot = opened.allocations[s.handle];
  if (!slot) slot = open_allocation(s.handle, index);
  auto alloc = std::static_pointer_cast<ipc_allocation>(slot);
  if (static_cast<unsigned __int128>(s.offset_bytes) + s.size_bytes > alloc->reach)
    throw bad("the storage (offset " + std::to_string(s.offset_bytes) + ", " + std::to_string(s.size_bytes) + " bytes) lies past its " +
              std::to_string(alloc->reach) + "-byte CUDA allocation");
  if (!s.event_handle.empty() && opened.events.insert(s.event_handle).second) {
    // The trainer's writes are complete before any copy.
    if (s.event_handle.size() != sizeof(cudaIpcEventHandle_t)) throw bad("a CUDA IPC event handle has the wrong size");
    cudaIpcEventHandle_t eh;
    std::memcpy(&eh, s.event_handle.data(), sizeof eh);
    cudaEvent_t ev;
    const cudaError_t status = cudaIpcOpenEventHandle(&ev, eh);
    if (status == cudaSuccess) {
      const cudaError_t waited = cudaEventSynchronize(ev);
      cudaEventDestroy(ev);
      check_cuda(waited, "waiting for the trainer's event");
    } else {
      // torch hands out IPC events from a pool; one this process mapped before may not open again. The
      // trainer's stream cannot be waited for then: its writes must be complete (torch.cuda.synchronize()
      // before the request, as SGLang's trainers do).
      cudaGetLastError();
      spdlog::warn("could not open the trainer's CUDA IPC event ({}); relying on the trainer having synchronized",
                   cudaGetErrorString(status));
    }
  }
  auto seg = std::make_shared<segment>();
  seg->base = static_cast<char*>(alloc->mapped) + s.offset_bytes;
  seg->size = s.size_bytes;
  seg->close = [alloc] {};  // the allocation closes with its last storage
  return seg;
#else
  (void)s, (void)opened;
  throw bad("this refit build has no CUDA: CUDA IPC handles cannot be opened");
#endif
}

}  // namespace

std::string gpu_uuid(const c10::Device& device) {
#ifdef REFIT_WITH_CUDA
  if (!device.is_cuda()) return "";
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device.has_index() ? device.index() : 0) != cudaSuccess) return "";
  const auto* u = reinterpret_cast<const unsigned char*>(prop.uuid.bytes);
  char out[64];
  std::snprintf(out, sizeof out, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2], u[3], u[4],
                u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
  return out;
#else
  (void)device;
  return "";
#endif
}

std::shared_ptr<received_weights> open_shared(const std::vector<shared_segment>& segments, const std::vector<shared_view>& views,
                                              const c10::Device& device, const std::string& origin, bool consume) {
  std::vector<std::shared_ptr<segment>> opened;
  ipc_opened ipc;
  for (const auto& s : segments) opened.push_back(s.cuda ? open_ipc(s, device, ipc) : open_shm(s, consume));
  auto set = std::make_shared<received_weights>(origin, /*borrowed=*/true);
  for (const auto& v : views) {
    const std::string what = "tensor '" + v.name + "'";
    if (v.segment >= opened.size()) throw bad(what + " names storage " + std::to_string(v.segment) + ", which was not sent");
    const auto& seg = opened[v.segment];
    if (v.shape.size() != v.stride.size())
      throw bad(what + ": " + std::to_string(v.shape.size()) + " sizes but " + std::to_string(v.stride.size()) + " strides");
    const uint64_t elem = c10::elementSize(v.dtype);
    if (v.offset_bytes % elem != 0) throw bad(what + ": offset " + std::to_string(v.offset_bytes) + " is not a multiple of its element size");
    // The last byte any element reaches, within the storage.
    bool empty = false;
    unsigned __int128 last = 0;
    for (size_t k = 0; k < v.shape.size(); ++k) {
      if (v.shape[k] < 0 || v.stride[k] < 0) throw bad(what + ": negative size or stride");
      if (v.shape[k] == 0) empty = true;
      else last += static_cast<unsigned __int128>(v.shape[k] - 1) * static_cast<uint64_t>(v.stride[k]);
    }
    const unsigned __int128 end = empty ? v.offset_bytes : v.offset_bytes + (last + 1) * elem;
    if (end > seg->size)
      throw bad(what + " reaches byte " + std::to_string(static_cast<uint64_t>(std::min<unsigned __int128>(end, UINT64_MAX))) +
                " of a " + std::to_string(seg->size) + "-byte storage");
    const auto options = at::TensorOptions().dtype(v.dtype).device(segments[v.segment].cuda ? device : c10::Device(c10::kCPU));
    at::Tensor t = empty || !seg->base
                       ? at::empty(v.shape, options)
                       : at::from_blob(static_cast<char*>(seg->base) + v.offset_bytes, v.shape, v.stride, [seg](void*) {}, options);
    set->add(v.module, v.name, std::move(t));
  }
  return set;
}

}  // namespace refit::transfer
