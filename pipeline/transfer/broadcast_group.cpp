#include "pipeline/transfer/broadcast_group.hpp"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <c10/util/Exception.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <optional>
#include <sstream>
#include <thread>

namespace refit::transfer {

namespace {

using clock = std::chrono::steady_clock;

c10::intrusive_ptr<c10d::Store> prefixed(const std::string& prefix, c10::intrusive_ptr<c10d::Store> store) {
  return c10::make_intrusive<c10d::PrefixStore>(prefix, std::move(store));
}

// c10::Error's what() carries a C++ backtrace; users get the message.
std::string describe(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

std::string describe(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return describe(x);
  } catch (...) {
    return "unknown error";
  }
}

// Gloo devices as torch's Python binding makes them: one per interface in GLOO_SOCKET_IFNAME, else the
// default (the address the host name resolves to). Both sides must agree, as must TORCH_GLOO_LAZY_INIT.
std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices() {
  const bool lazy = c10d::getDefaultGlooLazyInit();
  std::vector<std::shared_ptr<::gloo::transport::Device>> out;
  if (const char* names = std::getenv("GLOO_SOCKET_IFNAME"); names && *names) {
    std::stringstream ss(names);
    for (std::string name; std::getline(ss, name, ',');)
      if (!name.empty()) out.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name, lazy));
  }
  if (out.empty()) out.push_back(c10d::ProcessGroupGloo::createDefaultDevice(lazy));
  return out;
}

}  // namespace

bool backend_available(const std::string& backend) {
  if (backend == "gloo") return true;
#ifdef USE_C10D_NCCL
  return backend == "nccl";
#else
  return false;
#endif
}

struct broadcast_group::impl {
  c10::intrusive_ptr<c10d::TCPStore> tcp;
  c10::intrusive_ptr<c10d::Backend> pg;
  bool nccl = false;
};

broadcast_group::broadcast_group(group_spec spec) : spec_(std::move(spec)), impl_(std::make_unique<impl>()) {
  if (!backend_available(spec_.backend))
    throw std::invalid_argument("backend '" + spec_.backend + "' is not available in this build (gloo" +
                                std::string(backend_available("nccl") ? ", nccl" : "") + ")");
  if (spec_.master_port <= 0 || spec_.master_port > 65535)
    throw std::invalid_argument("master_port must be in 1..65535, got " + std::to_string(spec_.master_port));
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(spec_.master_port);
    so.isServer = false;
    so.numWorkers = static_cast<size_t>(spec_.world_size);  // counts this rank in, which rank 0 waits for
    so.waitWorkers = true;
    so.timeout = spec_.timeout;
    impl_->tcp = c10::make_intrusive<c10d::TCPStore>(spec_.master_address, so);
    // init_custom_process_group: PrefixStore(group_name); torch's process-group helper then adds
    // "group_name/" and one "device/" per device type of the backend.
    const std::string& g = spec_.group_name;
    auto base = prefixed(g + "/", prefixed(g, impl_->tcp));
    if (spec_.backend == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(spec_.timeout);
      opts->devices = gloo_devices();
      opts->threads = static_cast<int>(opts->devices.size()) * 2;
      opts->group_name = g;
      auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed("cpu/", base), spec_.rank, spec_.world_size, opts);
      pg->setSequenceNumberForGroup();
      impl_->pg = pg;
    } else {
#ifdef USE_C10D_NCCL
      // A collective that times out must end in an exception here, not in the process being killed
      // (torch's default, TORCH_NCCL_ASYNC_ERROR_HANDLING=3); an explicit setting is kept.
      setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2", 0);
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(spec_.cuda_device));
      auto opts = c10d::ProcessGroupNCCL::Options::create(false);
      // The watchdog's limit is past refit's own deadline, so that refit's abort comes first.
      opts->timeout = spec_.timeout + std::chrono::seconds(60);
      opts->group_name = g;
      auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed("cuda/", base), spec_.rank, spec_.world_size, opts);
      pg->setSequenceNumberForGroup();
      impl_->pg = pg;
      impl_->nccl = true;
#endif
    }
  } catch (const std::exception& e) {
    impl_.reset();
    throw std::runtime_error(describe(e));
  }
}

broadcast_group::~broadcast_group() {
  if (!impl_ || !impl_->pg) return;
  try {
    if (impl_->nccl) {
      // abort, never shutdown: NCCL's finalize waits for the other ranks, and the trainer typically destroys
      // its own group only after this server has answered destroy_weights_update_group. Nothing is pending.
      impl_->pg->abort();
    } else if (broken_) {
      // ~ProcessGroupGloo waits for receives still queued, which only gloo's timeout ends: not here.
      std::thread([pg = std::move(impl_->pg), tcp = std::move(impl_->tcp)]() mutable {
        pg.reset();
        tcp.reset();
      }).detach();
      return;
    }
  } catch (const std::exception& e) {
    spdlog::warn("group '{}': shutting down: {}", spec_.group_name, describe(e));
  }
  impl_->pg.reset();
  impl_->tcp.reset();
}

at::Device broadcast_group::device() const {
  if (impl_ && impl_->nccl) return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(spec_.cuda_device));
  return at::Device(at::kCPU);
}

void broadcast_group::receive(const std::vector<at::Tensor>& into) {
  if (broken_ || !impl_) throw transfer_error("group '" + spec_.group_name + "' is broken by an earlier failure");
  if (into.empty()) return;
  c10d::BroadcastOptions opts;
  opts.rootRank = 0;
  opts.rootTensor = 0;
  opts.timeout = spec_.timeout;  // gloo ends a receive that waits longer with its own error
  std::vector<c10::intrusive_ptr<c10d::Work>> posted;
  posted.reserve(into.size());
  std::string failure;
  size_t at = 0;  // the broadcast being posted or awaited
#ifdef USE_C10D_NCCL
  std::optional<c10::cuda::CUDAGuard> guard;
  if (impl_->nccl) guard.emplace(static_cast<c10::DeviceIndex>(spec_.cuda_device));
#endif
  try {
    for (at = 0; at < into.size(); ++at) {
      std::vector<at::Tensor> one{into[at]};
      posted.push_back(impl_->pg->broadcast(one, opts));
    }
    // Gloo reports its own timeout (with its message) first; refit's deadline catches NCCL, whose
    // receive from a dead peer never ends by itself.
    const auto limit = impl_->nccl ? spec_.timeout : spec_.timeout + std::chrono::seconds(5);
    auto progress = clock::now();
    for (at = 0; at < posted.size() && failure.empty(); ++at) {
      while (!posted[at]->isCompleted()) {
        if (clock::now() - progress > limit) {
          failure = fmt::format("no data for {:.1f} s (the trainer stopped sending, or died)", limit.count() / 1000.0);
          break;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      // exception(), not isSuccess(): WorkNCCL::isSuccess throws ("deprecated").
      if (failure.empty())
        if (auto e = posted[at]->exception()) failure = describe(e);
      progress = clock::now();
    }
    if (!failure.empty()) --at;  // the loop stepped past the one that failed
  } catch (const std::exception& e) {
    failure = describe(e);
  }
  if (failure.empty()) return;
  broken_ = true;
  if (impl_->nccl) {
    impl_->pg->abort();  // ends the kernels still waiting for the dead peer
  } else {
    // After a failure gloo fails the queued receives at once (a broken pair fails them); the wait is
    // bounded all the same, and the destructor does not block on any that is left.
    const auto until = clock::now() + std::chrono::seconds(2);
    for (auto& w : posted)
      while (!w->isCompleted() && clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  throw transfer_error("broadcast " + std::to_string(std::min(at, into.size() - 1) + 1) + " of " + std::to_string(into.size()) + " on group '" +
                       spec_.group_name + "' failed: " + failure);
}

}  // namespace refit::transfer
