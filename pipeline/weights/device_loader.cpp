#include "pipeline/weights/device_loader.hpp"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>

#include "pipeline/weights/convert.hpp"
#include "pipeline/weights/parallel.hpp"

#ifdef REFIT_TORCH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace refit::weights {

#ifdef REFIT_TORCH_CUDA

namespace {
constexpr uint64_t kDirectAlign = 4096;
// Below this share of pages in the page cache a file is read with O_DIRECT.
constexpr double kColdResidency = 0.5;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(e));
}

// Events recorded on streams, each with its stream's device current (CUDA's rule), destroyed with the holder.
struct recorded_events {
  std::vector<cudaEvent_t> all;
  recorded_events() = default;
  recorded_events(const recorded_events&) = delete;
  recorded_events& operator=(const recorded_events&) = delete;
  ~recorded_events() {
    for (auto e : all) cudaEventDestroy(e);
  }
  cudaEvent_t record(cudaStream_t stream, int device) {
    c10::cuda::CUDAGuard on_device(static_cast<c10::DeviceIndex>(device));
    cudaEvent_t e;
    check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    all.push_back(e);
    check(cudaEventRecord(e, stream), "cudaEventRecord");
    return e;
  }
  // `stream` waits for what the device's current stream has queued so far.
  void order_after_current(cudaStream_t stream, int device) {
    check(cudaStreamWaitEvent(stream, record(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream(), device), 0),
          "cudaStreamWaitEvent");
  }
};
}  // namespace

struct device_loader::impl {
  int device = 0;
  uint64_t slot_bytes = 0;
  unsigned threads = 8;
  std::vector<void*> slots;
  std::vector<cudaEvent_t> copied;      // recorded after the copy out of each slot
  std::vector<std::mutex> slot_locks;
  std::vector<c10::cuda::CUDAStream> streams;  // host-to-device; slot i's copies go on streams[i % size]
  // Other devices that replicas go to: each chunk, once on this device, is copied on from there device to device
  // (NVLink) on a stream of the other device, while the ring moves on (the copy does not read the slot).
  struct replica_device {
    c10::optional<c10::cuda::CUDAStream> stream;
  };
  std::map<int, replica_device> replica_devices;

  replica_device& replica_on(int dev) {
    auto& r = replica_devices[dev];
    if (r.stream) return r;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(dev));
    r.stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, static_cast<c10::DeviceIndex>(dev));
    int can = 0;
    if (cudaDeviceCanAccessPeer(&can, dev, device) == cudaSuccess && can) {
      const cudaError_t e = cudaDeviceEnablePeerAccess(device, 0);
      if (e != cudaSuccess) cudaGetLastError();  // already enabled (by torch, or an earlier read): fine
    }
    return r;
  }

  impl(int dev, uint64_t bytes, unsigned n, unsigned t, unsigned copy_streams)
      : device(dev), slot_bytes(bytes), threads(t), slot_locks(n) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    for (unsigned i = 0; i < std::max(1u, copy_streams); ++i)
      streams.push_back(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, static_cast<c10::DeviceIndex>(device)));
    for (unsigned i = 0; i < n; ++i) {
      void* p = nullptr;
      // Room for an O_DIRECT read widened to page boundaries on both sides. Portable: replicas on other devices
      // are copied from the same slots at the pinned rate.
      check(cudaHostAlloc(&p, slot_bytes + 2 * kDirectAlign, cudaHostAllocPortable), "cudaHostAlloc of the staging ring");
      slots.push_back(p);
      cudaEvent_t e;
      check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
      copied.push_back(e);
    }
  }
  ~impl() {
    for (auto e : copied) cudaEventDestroy(e);
    for (auto p : slots) cudaFreeHost(p);
  }
};

device_loader::device_loader(int device_index, uint64_t slot_bytes, unsigned slots, unsigned threads, unsigned copy_streams)
    : impl_(std::make_unique<impl>(device_index, slot_bytes, slots, threads, copy_streams)) {}

device_loader::~device_loader() = default;

bool device_loader::available() { return true; }

device_read_stats device_loader::read_into(const module_weights& w, const named_tensors& out, const host_load_options& options,
                                            const std::vector<std::vector<at::Tensor>>* replicas) {
  std::unique_lock busy(busy_);
  impl& m = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(m.device));
  // The destinations may be memory the caller's stream (the device's default one, which generation uses too) has
  // just freed and reallocated, with kernels still reading it: the copy streams start after that stream's work.
  recorded_events before, done;
  for (auto& st : m.streams) before.order_after_current(st.stream(), m.device);
  c10::cuda::CUDAStreamGuard on_stream(m.streams.front());  // conversions follow the copies on the first stream

  // Each destination receives the file's raw bytes, either directly or, when the dtype changes, into a
  // device buffer of the stored dtype that is converted after the copies.
  struct target {
    const tensor_entry* entry;
    const safetensors_file* file;
    std::byte* device_bytes;
    at::Tensor raw;  // defined when a conversion follows
    const at::Tensor* dst;
    int direct_fd = -1;  // O_DIRECT descriptor of a cold file
    std::vector<std::pair<std::byte*, int>> copies;  // replicas filled from the same slots: bytes, device
    std::vector<at::Tensor> converted_copies;        // replicas of a converted destination: copied after the conversion
  };
  // Cold shards get an O_DIRECT descriptor, closed when the read ends.
  std::map<const safetensors_file*, int> direct;
  struct close_all {
    std::map<const safetensors_file*, int>& fds;
    ~close_all() {
      for (auto& [f, fd] : fds)
        if (fd >= 0) ::close(fd);
    }
  } closer{direct};
  for (const auto& shard : w.shards) {
    // Opened through the shard's own scope (beneath the allowed roots) and only when it is the very file
    // opened before; otherwise (renamed into place meanwhile) the opened one is read without O_DIRECT.
    direct[&shard] = shard.resident_fraction() < kColdResidency ? shard.reopen(O_RDONLY | O_DIRECT).release() : -1;
  }
  std::vector<target> targets;
  struct chunk {
    size_t target;
    uint64_t offset, len;
  };
  std::vector<chunk> chunks;
  for (const auto& [name, dst] : out) {
    auto it = w.tensors.find(name);
    if (it == w.tensors.end()) throw weight_error(weight_errc::shard_mismatch, w.dir.string() + ": no tensor '" + name + "' to read");
    const tensor_entry& t = *it->second.entry;
    const dtype held = held_dtype(t.type, options.float_dtype);
    if (!dst.is_cuda() || !dst.is_contiguous() || dst.sizes().vec() != t.shape || dst.scalar_type() != to_scalar_type(held))
      throw weight_error(weight_errc::bad_shape, w.dir.string() + ": tensor '" + name + "': destination is not a contiguous CUDA tensor of its shape and dtype");
    target tg{&t, &w.shards[it->second.shard], nullptr, {}, &dst, direct[&w.shards[it->second.shard]], {}, {}};
    if (replicas)
      for (const at::Tensor& r : replicas->at(targets.size())) {
        if (!r.is_cuda() || !r.is_contiguous() || r.sizes() != dst.sizes() || r.scalar_type() != dst.scalar_type())
          throw weight_error(weight_errc::bad_shape, w.dir.string() + ": tensor '" + name + "': a replica is not a contiguous CUDA tensor like its destination");
        if (held == t.type) {
          m.replica_on(r.device().index());
          tg.copies.emplace_back(static_cast<std::byte*>(r.data_ptr()), r.device().index());
        } else {
          tg.converted_copies.push_back(r);
        }
      }
    if (held == t.type) {
      tg.device_bytes = static_cast<std::byte*>(dst.data_ptr());
    } else {
      tg.raw = at::empty(t.shape, dst.options().dtype(to_scalar_type(t.type)));
      tg.device_bytes = static_cast<std::byte*>(tg.raw.data_ptr());
    }
    for (uint64_t off = 0; off < t.nbytes(); off += m.slot_bytes)
      chunks.push_back({targets.size(), off, std::min(m.slot_bytes, t.nbytes() - off)});
    targets.push_back(std::move(tg));
  }

  // Replicas on other devices likewise start after their device's current stream. Every stream this read queues
  // work on is listed while the lock is held (the next read may add replica devices).
  std::vector<cudaStream_t> used;
  for (auto& st : m.streams) used.push_back(st.stream());
  for (auto& [dev, r] : m.replica_devices) {
    before.order_after_current(r.stream->stream(), dev);
    used.push_back(r.stream->stream());
  }
  const size_t n_slots = m.slots.size();
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> direct_bytes{0};
  auto read_all = [&](size_t) {
    for (;;) {
      const size_t i = next.fetch_add(1);
      if (i >= chunks.size()) return;
      const chunk& c = chunks[i];
      const target& tg = targets[c.target];
      const size_t s = i % n_slots;
      std::lock_guard slot(m.slot_locks[s]);
      check(cudaEventSynchronize(m.copied[s]), "waiting for a staging slot");  // its previous copy is done
      auto* buf = static_cast<std::byte*>(m.slots[s]);
      const uint64_t at = tg.file->file_offset(*tg.entry) + c.offset;
      // O_DIRECT needs page-aligned offsets and lengths: read the enclosing pages, copy from inside them.
      const bool use_direct = tg.direct_fd >= 0;
      const uint64_t start = use_direct ? at / kDirectAlign * kDirectAlign : at;
      const uint64_t skip = at - start;
      const uint64_t want = use_direct ? (skip + c.len + kDirectAlign - 1) / kDirectAlign * kDirectAlign : c.len;
      const int fd = use_direct ? tg.direct_fd : tg.file->fd();
      uint64_t done = 0;
      while (done < skip + c.len) {
        ssize_t r = ::pread(fd, buf + done, want - done, static_cast<off_t>(start + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
          throw weight_error(weight_errc::io_error, tg.file->path().string() + ": tensor '" + tg.entry->name + "': read failed" +
                                                        (r < 0 ? std::string(": ") + std::strerror(errno) : ": file shrank"));
        done += static_cast<uint64_t>(r);
      }
      if (use_direct) direct_bytes += c.len;
      const cudaStream_t stream = m.streams[s % m.streams.size()].stream();
      check(cudaMemcpyAsync(tg.device_bytes + c.offset, buf + skip, c.len, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
      check(cudaEventRecord(m.copied[s], stream), "cudaEventRecord");
      for (const auto& [bytes, dev] : tg.copies) {  // then on to another GPU, device to device, once it has arrived here
        const cudaStream_t peer = m.replica_devices.at(dev).stream->stream();
        check(cudaStreamWaitEvent(peer, m.copied[s], 0), "cudaStreamWaitEvent");
        check(cudaMemcpyPeerAsync(bytes + c.offset, dev, tg.device_bytes + c.offset, m.device, c.len, peer), "cudaMemcpyPeerAsync");
      }
    }
  };
  try {
    parallel_for_each(std::min<size_t>(m.threads, std::max<size_t>(1, chunks.size())), m.threads, read_all);
    // Every chunk is read and its copy queued: what remains is on the streams. The conversions follow the copies on
    // the first stream (and the converted replicas the conversions); then the ring is the next read's (its copies
    // queue behind these, each slot's event orders the reuse), and this read waits for its own work alone.
    const cudaStream_t first = m.streams.front().stream();
    for (size_t i = 1; i < m.streams.size(); ++i)
      check(cudaStreamWaitEvent(first, done.record(m.streams[i].stream(), m.device), 0), "cudaStreamWaitEvent");
    for (auto& tg : targets) {
      if (!tg.raw.defined()) continue;
      const_cast<at::Tensor*>(tg.dst)->copy_(tg.raw, /*non_blocking=*/true);  // on the first stream
      for (auto& r : tg.converted_copies) r.copy_(*tg.dst);                   // device to device, after it
    }
    done.record(first, m.device);
    for (auto& [dev, r] : m.replica_devices) done.record(r.stream->stream(), dev);
    busy.unlock();
    for (auto e : done.all) check(cudaEventSynchronize(e), "waiting for the copies");
  } catch (...) {
    // Copies already queued write into the destinations, which the caller frees on failure, and into the conversion
    // buffers freed on the way out: let them land first.
    for (auto st : used) cudaStreamSynchronize(st);
    throw;
  }
  std::set<int> converted_on;
  for (auto& tg : targets)
    for (auto& r : tg.converted_copies) converted_on.insert(r.device().index());
  for (int dev : converted_on) {
    check(cudaSetDevice(dev), "cudaSetDevice");
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  if (!converted_on.empty()) check(cudaSetDevice(m.device), "cudaSetDevice");
  std::set<const safetensors_file*> read;
  for (const auto& tg : targets) read.insert(tg.file);
  for (const auto* file : read) file->check_unchanged();

  device_read_stats st;
  for (auto& tg : targets) st.bytes += tg.entry->nbytes();
  st.chunks = chunks.size();
  st.direct_bytes = direct_bytes.load();
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return st;
}

namespace {
constexpr size_t huge_page = 2ull << 20;

// Anonymous memory, asked for huge pages, first touched by every core (the kernel zeroes pages on first
// touch: one thread does ~2-3 GB/s), then registered with CUDA. On the H200 host this pins 8 GB in 0.35 s
// against 2.8-3.7 s for cudaHostAlloc, with the same host-to-device copy rate (bench_pin, bench/RESULTS.md).
// The block starts on a huge-page boundary and is not inherited by a child process. Returns nullptr when
// any step fails; the caller falls back to cudaHostAlloc.
void* map_and_register(size_t bytes) {
  const size_t mapped = bytes + huge_page;
  void* raw = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  // Keep [p, p + bytes) with p aligned; give back the rest on both sides.
  auto* base = static_cast<char*>(raw);
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + huge_page - 1) / huge_page * huge_page);
  if (p > base) munmap(base, static_cast<size_t>(p - base));
  if (char* end = base + mapped; end > p + bytes) munmap(p + bytes, static_cast<size_t>(end - (p + bytes)));
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without transparent huge pages it changes nothing
  madvise(p, bytes, MADV_DONTFORK);
  constexpr size_t chunk = 64ull << 20;
  try {
    parallel_for_each((bytes + chunk - 1) / chunk, 0, [&](size_t i) {
      const size_t begin = i * chunk;
      std::memset(p + begin, 0, std::min(chunk, bytes - begin));
    });
  } catch (...) {  // no threads to be had
    munmap(p, bytes);
    return nullptr;
  }
  if (cudaHostRegister(p, bytes, cudaHostRegisterDefault) != cudaSuccess) {
    cudaGetLastError();  // clear it: the fallback reports its own
    munmap(p, bytes);
    return nullptr;
  }
  return p;
}
}  // namespace

at::Tensor pinned_host_tensor(int64_t numel, c10::ScalarType dtype) {
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  const auto options = at::TensorOptions().dtype(dtype);
  if (bytes == 0) return at::empty({numel}, options);
  if (void* p = map_and_register(bytes))
    return at::from_blob(p, {numel}, [bytes](void* q) { cudaHostUnregister(q); munmap(q, bytes); }, options);
  void* p = nullptr;
  const cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocDefault);
  if (e != cudaSuccess) throw std::runtime_error("cannot pin " + std::to_string(bytes) + " bytes of host memory: " + cudaGetErrorString(e));
  return at::from_blob(p, {numel}, [](void* q) { cudaFreeHost(q); }, options);
}

#else  // no CUDA in this build

at::Tensor pinned_host_tensor(int64_t, c10::ScalarType) { throw std::runtime_error("refit was built without CUDA"); }

struct device_loader::impl {};
device_loader::device_loader(int, uint64_t, unsigned, unsigned, unsigned) { throw std::runtime_error("refit was built without CUDA"); }
device_loader::~device_loader() = default;
bool device_loader::available() { return false; }
device_read_stats device_loader::read_into(const module_weights&, const named_tensors&, const host_load_options&,
                                            const std::vector<std::vector<at::Tensor>>*) {
  throw std::runtime_error("refit was built without CUDA");
}

#endif

}  // namespace refit::weights
