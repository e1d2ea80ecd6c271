#include "pipeline/models/layer_offload.hpp"

#include <ATen/ATen.h>

#include <cmath>
#include <stdexcept>

#include "pipeline/weights/device_loader.hpp"

#ifdef REFIT_TORCH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace refit::models {

namespace {

// Each tensor starts 512 bytes into its buffer's alignment, like a fresh allocation, so kernels see the
// same alignment as without offload.
constexpr int64_t align_bytes = 512;

int64_t align_up(int64_t elems, int64_t elem_size) {
  const int64_t unit = align_bytes / elem_size;
  return (elems + unit - 1) / unit * unit;
}

#ifdef REFIT_TORCH_CUDA
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("layer offload: ") + what + ": " + cudaGetErrorString(e));
}
#endif

}  // namespace

struct layer_offload::device_slot {
  std::map<c10::ScalarType, at::Tensor> buffers;  // 1-D, sized for the largest block
  int64_t layer = -1;
#ifdef REFIT_TORCH_CUDA
  cudaEvent_t ready = nullptr;  // recorded on the copy stream when the block's copy is complete
  cudaEvent_t freed = nullptr;  // recorded on the compute stream when the block's compute is done
#endif
};

struct layer_offload::cuda_state {
#ifdef REFIT_TORCH_CUDA
  explicit cuda_state(at::DeviceIndex index) : copy(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, index)) {}
  c10::cuda::CUDAStream copy;
#endif
};

layer_offload::layer_offload(tensor_registry& registry, const std::vector<std::string>& prefixes, at::Device device,
                             c10::ScalarType float_dtype, double prefetch_size)
    : device_(device) {
  if (prefixes.empty()) throw std::invalid_argument("layer offload: the model has no blocks to offload");
  if (!(prefetch_size > 0) || !std::isfinite(prefetch_size))
    throw std::invalid_argument("layer offload: the prefetch size must be a positive number of blocks or a fraction of them");
  if (prefetch_size >= 1 && prefetch_size != std::floor(prefetch_size))
    throw std::invalid_argument("layer offload: a prefetch size of 1 or more must be a whole number of blocks");
  const auto n = static_cast<int64_t>(prefixes.size());
  // More than n - 1 blocks ahead is every block: one device slot each, nothing moves after the first call.
  const double blocks = prefetch_size < 1 ? std::ceil(prefetch_size * static_cast<double>(n)) : prefetch_size;
  prefetch_ = std::max<int64_t>(1, static_cast<int64_t>(std::min(blocks, static_cast<double>(std::max<int64_t>(1, n - 1)))));

  layers_.resize(prefixes.size());
  slot_layer_.assign(registry.slots().size(), -1);
  for (size_t i = 0; i < registry.slots().size(); ++i) {
    const tensor_slot& s = registry.slots()[i];
    for (size_t l = 0; l < prefixes.size(); ++l) {
      if (s.name.compare(0, prefixes[l].size(), prefixes[l]) != 0) continue;
      layer& L = layers_[l];
      const c10::ScalarType dt = s.fixed_dtype.value_or(float_dtype);
      int64_t numel = 1;
      for (int64_t d : s.shape) numel *= d;
      int64_t& used = L.numel[dt];
      L.members.push_back({i, s.tensor, dt, used, numel, s.shape});
      used += align_up(numel, c10::elementSize(dt));
      slot_layer_[i] = static_cast<int>(l);
      break;
    }
  }
  for (size_t l = 0; l < layers_.size(); ++l)
    if (layers_[l].members.empty()) throw std::invalid_argument("layer offload: no parameters under '" + prefixes[l] + "'");
  for (const auto& L : layers_)
    for (const auto& [dt, numel] : L.numel) {
      slot_numel_[dt] = std::max(slot_numel_[dt], numel);
      host_bytes_ += static_cast<uint64_t>(numel) * c10::elementSize(dt);
    }

  live_ = make_store(device_.is_cuda());
  for (const auto& [dt, numel] : slot_numel_) placeholders_[dt] = at::empty({0}, at::TensorOptions().dtype(dt).device(device_));
  const size_t n_slots = static_cast<size_t>(std::min<int64_t>(prefetch_ + 1, n));
#ifdef REFIT_TORCH_CUDA
  if (device_.is_cuda()) cuda_ = std::make_unique<cuda_state>(device_.index() < 0 ? 0 : device_.index());
#else
  if (device_.is_cuda()) throw std::runtime_error("layer offload: this build has no CUDA support");
#endif
  for (size_t s = 0; s < n_slots; ++s) {
    auto slot = std::make_unique<device_slot>();
    for (const auto& [dt, numel] : slot_numel_) slot->buffers[dt] = at::empty({numel}, at::TensorOptions().dtype(dt).device(device_));
#ifdef REFIT_TORCH_CUDA
    if (cuda_) {
      c10::cuda::CUDAGuard guard(device_);
      check(cudaEventCreateWithFlags(&slot->ready, cudaEventDisableTiming), "cudaEventCreate");
      check(cudaEventCreateWithFlags(&slot->freed, cudaEventDisableTiming), "cudaEventCreate");
    }
#endif
    slots_.push_back(std::move(slot));
  }
  layer_slot_.assign(layers_.size(), -1);
  in_use_.assign(layers_.size(), false);
  for (int64_t l = 0; l < n; ++l) park_members_locked(l);
}

layer_offload::~layer_offload() {
#ifdef REFIT_TORCH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    cudaStreamSynchronize(cuda_->copy.stream());
    cudaDeviceSynchronize();
    for (auto& s : slots_) {
      cudaEventDestroy(s->ready);
      cudaEventDestroy(s->freed);
    }
  }
#endif
}

layer_offload::store layer_offload::make_store(bool pinned) const {
  // One allocation per dtype for all blocks, each block a slice; pinned ones of the exact size.
  std::map<c10::ScalarType, int64_t> total;
  for (const auto& L : layers_)
    for (const auto& [dt, numel] : L.numel) total[dt] += numel;
  std::map<c10::ScalarType, at::Tensor> bases;
  for (const auto& [dt, numel] : total)
    bases[dt] = pinned ? weights::pinned_host_tensor(numel, dt) : at::empty({numel}, at::TensorOptions().dtype(dt));
  store st;
  std::map<c10::ScalarType, int64_t> used;
  for (const auto& L : layers_) {
    std::map<c10::ScalarType, at::Tensor> bufs;
    for (const auto& [dt, numel] : L.numel) {
      bufs[dt] = bases.at(dt).narrow(0, used[dt], numel);
      used[dt] += numel;
    }
    st.buffers.push_back(std::move(bufs));
  }
  return st;
}

namespace {
at::Tensor view_of(const std::map<c10::ScalarType, at::Tensor>& buffers, c10::ScalarType dt, int64_t offset, int64_t numel,
                   const std::vector<int64_t>& shape) {
  return buffers.at(dt).narrow(0, offset, numel).view(shape);
}
}  // namespace

at::Tensor layer_offload::host_tensor(size_t slot) const {
  if (!offloaded(slot)) return {};
  std::lock_guard lock(mu_);
  const int l = slot_layer_[slot];
  for (const auto& m : layers_[l].members)
    if (m.slot == slot) return view_of(live_.buffers[l], m.dtype, m.offset, m.numel, m.shape);
  return {};
}

at::Tensor layer_offload::spare_tensor(size_t slot) {
  if (!offloaded(slot)) return {};
  if (!spare_allocated()) {
    // Pinning gigabytes takes seconds: not while holding the lock the compute thread takes per block.
    store fresh = make_store(device_.is_cuda());
    std::lock_guard lock(mu_);
    if (spare_.buffers.empty()) spare_ = std::move(fresh);
  }
  std::lock_guard lock(mu_);
  const int l = slot_layer_[slot];
  for (const auto& m : layers_[l].members)
    if (m.slot == slot) return view_of(spare_.buffers[l], m.dtype, m.offset, m.numel, m.shape);
  return {};
}

bool layer_offload::spare_allocated() const {
  std::lock_guard lock(mu_);
  return !spare_.buffers.empty();
}

void layer_offload::point_members_locked(int64_t l, size_t s) {
  for (const auto& m : layers_[l].members) *m.tensor = view_of(slots_[s]->buffers, m.dtype, m.offset, m.numel, m.shape);
}

void layer_offload::park_members_locked(int64_t l) {
  for (const auto& m : layers_[l].members) *m.tensor = placeholders_.at(m.dtype);
}

void layer_offload::copy_into_slot_locked(int64_t l, size_t s) {
  device_slot& slot = *slots_[s];
  for (const auto& [dt, host] : live_.buffers[l]) {
    at::Tensor dst = slot.buffers.at(dt).narrow(0, 0, host.numel());
#ifdef REFIT_TORCH_CUDA
    if (cuda_) {
      c10::cuda::CUDAGuard guard(device_);
      const cudaStream_t copy = cuda_->copy.stream();
      // Not before the compute that last read this slot is done.
      check(cudaStreamWaitEvent(copy, slot.freed, 0), "cudaStreamWaitEvent");
      check(cudaMemcpyAsync(dst.data_ptr(), host.data_ptr(), host.nbytes(), cudaMemcpyHostToDevice, copy), "cudaMemcpyAsync");
      continue;
    }
#endif
    dst.copy_(host);
  }
#ifdef REFIT_TORCH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    check(cudaEventRecord(slot.ready, cuda_->copy.stream()), "cudaEventRecord");
  }
#endif
  slot.layer = l;
  layer_slot_[l] = static_cast<int>(s);
}

void layer_offload::fill_locked() {
  const int64_t n = layers();
  while (true) {
    const int64_t l = next_prefetch_;
    if (layer_slot_[l] >= 0 || in_use_[l]) return;  // everything ahead is resident already
    size_t free_slot = slots_.size();
    for (size_t s = 0; s < slots_.size(); ++s)
      if (slots_[s]->layer < 0) {
        free_slot = s;
        break;
      }
    if (free_slot == slots_.size()) return;
    copy_into_slot_locked(l, free_slot);
    ++prefetches_;
    for (const auto& [dt, host] : live_.buffers[l]) prefetched_bytes_ += host.nbytes();
    next_prefetch_ = (l + 1) % n;
  }
}

void layer_offload::acquire(int64_t l) {
  std::lock_guard lock(mu_);
  if (l < 0 || l >= layers()) throw std::out_of_range("layer offload: no block " + std::to_string(l));
  if (layer_slot_[l] < 0) {
    // Out of the expected order (the first block of the first request, or after recover()): drop the
    // blocks prefetched for another position and start prefetching here.
    for (auto& s : slots_)
      if (s->layer >= 0 && !in_use_[s->layer]) {
        layer_slot_[s->layer] = -1;
        s->layer = -1;
      }
    next_prefetch_ = l;
    fill_locked();
    if (layer_slot_[l] < 0) throw std::logic_error("layer offload: no free device slot for block " + std::to_string(l));
  }
  const auto s = static_cast<size_t>(layer_slot_[l]);
  in_use_[l] = true;
#ifdef REFIT_TORCH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    check(cudaStreamWaitEvent(c10::cuda::getCurrentCUDAStream(device_.index()).stream(), slots_[s]->ready, 0), "cudaStreamWaitEvent");
  }
#endif
  point_members_locked(l, s);
}

void layer_offload::release(int64_t l) {
  std::lock_guard lock(mu_);
  if (l < 0 || l >= layers() || !in_use_[l]) throw std::logic_error("layer offload: block " + std::to_string(l) + " released but not acquired");
  const auto s = static_cast<size_t>(layer_slot_[l]);
  in_use_[l] = false;
#ifdef REFIT_TORCH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    check(cudaEventRecord(slots_[s]->freed, c10::cuda::getCurrentCUDAStream(device_.index()).stream()), "cudaEventRecord");
  }
#endif
  // With a slot for every block, every block stays resident: nothing needs to move.
  if (slots_.size() >= layers_.size()) return;
  park_members_locked(l);
  layer_slot_[l] = -1;
  slots_[s]->layer = -1;
  fill_locked();
}

void layer_offload::recover() {
  std::lock_guard lock(mu_);
#ifdef REFIT_TORCH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    cudaDeviceSynchronize();
  }
#endif
  for (auto& s : slots_) s->layer = -1;
  for (int64_t l = 0; l < layers(); ++l) {
    layer_slot_[l] = -1;
    in_use_[l] = false;
    park_members_locked(l);
  }
  next_prefetch_ = 0;
}

void layer_offload::quiesce() {
#ifdef REFIT_TORCH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    check(cudaStreamSynchronize(cuda_->copy.stream()), "cudaStreamSynchronize");
  }
#endif
}

void layer_offload::refresh_resident() {
  std::lock_guard lock(mu_);
  for (size_t s = 0; s < slots_.size(); ++s)
    if (slots_[s]->layer >= 0 && in_use_[slots_[s]->layer])
      throw std::logic_error("layer offload: block " + std::to_string(slots_[s]->layer) +
                             " is computing; weights may only change while generation is drained");
  for (size_t s = 0; s < slots_.size(); ++s) {
    const int64_t l = slots_[s]->layer;
    if (l < 0) continue;
    copy_into_slot_locked(l, s);
    ++refreshes_;
  }
  // Not waited for: the next acquire makes the compute stream wait for the block's new `ready`, so the
  // copies overlap whatever runs first after the update, and the generation pause stays short. Whoever
  // writes a host store next calls quiesce() first.
}

void layer_offload::swap_stores() {
  quiesce();
  {
    std::lock_guard lock(mu_);
    if (spare_.buffers.empty()) throw std::logic_error("layer offload: no second host store to swap in");
    std::swap(live_, spare_);
  }
  try {
    refresh_resident();
  } catch (...) {
    // All or nothing: the previous store is live again, and no slot keeps a half-made copy.
    std::lock_guard lock(mu_);
    std::swap(live_, spare_);
    drop_resident_locked();
    throw;
  }
}

void layer_offload::drop_resident_locked() {
  for (auto& s : slots_) {
    if (s->layer < 0 || in_use_[s->layer]) continue;
    park_members_locked(s->layer);
    layer_slot_[s->layer] = -1;
    s->layer = -1;
  }
}

layer_offload_info layer_offload::info() const {
  std::lock_guard lock(mu_);
  layer_offload_info i;
  i.layers = layers();
  i.prefetch_size = prefetch_;
  i.slots = static_cast<int64_t>(slots_.size());
  for (const auto& s : slots_)
    if (s->layer >= 0) i.resident.push_back(s->layer);
  i.host_bytes = host_bytes_;
  i.spare_host_bytes = spare_.buffers.empty() ? 0 : host_bytes_;
  for (const auto& s : slots_)
    for (const auto& [dt, buf] : s->buffers) i.device_bytes += buf.nbytes();
  i.prefetches = prefetches_;
  i.prefetched_bytes = prefetched_bytes_;
  i.refreshes = refreshes_;
  return i;
}

}  // namespace refit::models
