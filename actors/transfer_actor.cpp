#include "actors/transfer_actor.hpp"

#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <spdlog/spdlog.h>

#include <cctype>
#include <map>

#include "pipeline/pipeline.hpp"
#include "pipeline/transfer/broadcast_group.hpp"
#include "pipeline/transfer/broadcast_receive.hpp"
#include "pipeline/transfer/received_weights.hpp"
#include "pipeline/transfer/shared_tensors.hpp"
#include "pipeline/update/memory.hpp"
#include "pipeline/weights/dtype.hpp"
#include "pipeline/weights/host_loader.hpp"

namespace refit::actors {

using msg::refit_errc;

namespace {

using clock = std::chrono::steady_clock;

double since(clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); }

std::string describe(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

struct transfer_state {
  transfer_setup setup;
  std::map<std::string, std::unique_ptr<transfer::broadcast_group>> groups;

  std::string worker() const { return "worker " + std::to_string(setup.index); }

  std::string group_list() const {
    std::string out = "[";
    for (const auto& [name, _] : groups) out += (out.size() > 1 ? ", '" : "'") + name + "'";
    return out + "]";
  }

  // A transfer failed: the group is out of step with the trainer, so it goes.
  std::string leave_broken(const std::string& name) {
    groups.erase(name);
    spdlog::warn("{}: left group '{}' after a failed transfer", worker(), name);
    return " Group '" + name + "' was destroyed on " + worker() + "; call init_weights_update_group again.";
  }
};

msg::group_result join(transfer_state& st, const msg::group_request& req, int32_t rank) {
  msg::group_result r;
  const auto where = st.setup.pipeline->placement().device;
  try {
    if (st.groups.count(req.group_name))
      throw std::invalid_argument("group '" + req.group_name + "' already exists on " + st.worker() +
                                  "; destroy it first (destroy_weights_update_group)");
    if (req.backend == "nccl" && !where.is_cuda())
      throw std::invalid_argument("backend 'nccl' needs a GPU, and " + st.worker() + " runs on " + where.str() + "; use 'gloo'");
    transfer::group_spec spec;
    spec.master_address = req.master_address;
    spec.master_port = req.master_port;
    spec.rank = rank;
    spec.world_size = req.world_size;
    spec.group_name = req.group_name;
    spec.backend = req.backend;
    spec.timeout = st.setup.timeout;
    spec.cuda_device = where.is_cuda() ? (where.has_index() ? where.index() : 0) : -1;
    spdlog::info("{}: joining group '{}' ({}) at {}:{} as rank {} of {}", st.worker(), req.group_name, req.backend, req.master_address,
                 req.master_port, rank, req.world_size);
    const auto t0 = clock::now();
    auto group = std::make_unique<transfer::broadcast_group>(spec);
    spdlog::info("{}: joined group '{}' in {:.3f} s", st.worker(), req.group_name, since(t0));
    st.groups[req.group_name] = std::move(group);
    r.success = true;
    r.message = "Succeeded to initialize custom process group.";
  } catch (const std::exception& e) {
    r.message = "Failed to initialize custom process group: " + describe(e) + ".";
    spdlog::error("{}: {}", st.worker(), r.message);
  }
  return r;
}

msg::group_result leave(transfer_state& st, const std::string& name) {
  msg::group_result r;
  auto it = st.groups.find(name);
  if (it == st.groups.end()) {
    r.message = "The group to be destroyed does not exist.";
    return r;
  }
  st.groups.erase(it);
  spdlog::info("{}: left group '{}'", st.worker(), name);
  r.success = true;
  r.message = "Succeeded to destroy custom process group.";
  return r;
}

transfer::announcement to_announcement(const msg::receive_request& req) {
  transfer::announcement a;
  a.flattened_bucket = req.flattened_bucket;
  a.lora = req.lora;
  for (const auto& t : req.tensors) {
    const auto dt = weights::parse_torch_dtype(t.dtype);
    if (!dt) throw std::invalid_argument("tensor '" + t.wire_name + "': unknown dtype '" + t.dtype + "'");
    a.tensors.push_back({t.module, t.name, t.wire_name, weights::to_scalar_type(*dt), t.shape});
  }
  return a;
}

// SGLang's payload selection: one payload for every worker; else the one exported from this worker's GPU
// (payload_gpu_uuids); else one per worker, by index.
const msg::shared_payload& payload_for(const transfer_state& st, const std::vector<msg::shared_payload>& payloads) {
  if (!payloads.front().gpu_uuid.empty()) {
    if (!st.setup.pipeline->placement().device.is_cuda())
      throw std::invalid_argument("payload_gpu_uuids name GPUs, but " + st.worker() + " runs on " +
                                  st.setup.pipeline->placement().device.str() + "; leave them out for CPU tensors");
    const std::string own = transfer::gpu_uuid(st.setup.pipeline->placement().device);
    auto norm = [](std::string u) {
      for (const char* p : {"MIG-", "GPU-"})
        if (u.rfind(p, 0) == 0) u = u.substr(4);
      for (auto& c : u) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return u;
    };
    for (const auto& p : payloads)
      if (!own.empty() && norm(p.gpu_uuid) == norm(own)) return p;
    throw std::invalid_argument("no payload was exported from this worker's GPU " + (own.empty() ? std::string("(none: a CPU worker)") : own));
  }
  if (payloads.size() == 1) return payloads.front();
  return payloads.at(static_cast<size_t>(st.setup.index));  // the transaction checked there is one per worker
}

// A colocated trainer's shared tensors: checked against the modules, then opened (nothing is copied yet).
caf::result<msg::receive_report> open_shared(transfer_state& st, const msg::receive_request& req) {
  const auto t0 = clock::now();
  try {
    const msg::shared_payload& p = payload_for(st, req.shared);
    transfer::announcement a;
    a.lora = req.lora;
    std::vector<transfer::shared_view> views;
    for (const auto& t : p.tensors) {
      const auto dt = weights::parse_torch_dtype(t.dtype);
      if (!dt) throw std::invalid_argument("tensor '" + t.name + "': unknown dtype '" + t.dtype + "'");
      a.tensors.push_back({t.module, t.name, t.name, weights::to_scalar_type(*dt), t.shape});
      views.push_back({t.module, t.name, weights::to_scalar_type(*dt), t.shape, t.stride, t.offset_bytes, t.storage});
    }
    transfer::check_announcement(*st.setup.pipeline, a);
    std::vector<transfer::shared_segment> segments;
    for (const auto& s : p.storages)
      segments.push_back({s.kind == msg::storage_kind::cuda_ipc, s.handle, s.size_bytes, s.offset_bytes, s.device, s.event_handle});
    // One payload for every worker: worker 0 takes over the pickle's references; else each its own.
    const bool consume = req.shared.size() > 1 || st.setup.index == 0;
    auto set = transfer::open_shared(segments, views, st.setup.pipeline->placement().device,
                                     "tensors shared by the trainer (" + std::to_string(views.size()) + ")", consume);
    msg::receive_report r;
    r.worker = st.setup.index;
    r.tensors = views.size();
    r.bytes = a.bytes();
    r.seconds = since(t0);
    st.setup.received->put(req.update, std::move(set));
    spdlog::info("{}: opened {} shared tensor(s), {:.1f} MB, in {} storage(s) in {:.3f} s", st.worker(), r.tensors, r.bytes / 1e6,
                 segments.size(), r.seconds);
    return r;
  } catch (const std::exception& e) {
    return msg::make_error(refit_errc::invalid_request, describe(e));
  }
}

caf::result<msg::receive_report> receive(transfer_state& st, const msg::receive_request& req) {
  if (!req.shared.empty()) return open_shared(st, req);
  auto it = st.groups.find(req.group_name);
  if (it == st.groups.end())
    return msg::make_error(refit_errc::invalid_request, "Group '" + req.group_name + "' not in " + st.group_list() + " on " + st.worker() +
                                                            ". Please call `init_weights_update_group` first.");
  transfer::broadcast_group& group = *it->second;
  transfer::announcement a;
  std::string refused = req.refused;
  try {
    if (req.tensors.empty()) throw std::invalid_argument("the request announces no tensor that can be sized");
    a = to_announcement(req);
    a.bytes();  // sizes are sane
  } catch (const std::exception& e) {
    // Without names, dtypes and shapes the bytes on the wire are unknown: the group cannot be kept in step.
    const std::string why = refused.empty() ? describe(e) : refused;
    return msg::make_error(refit_errc::invalid_request, why + ". The size of the trainer's broadcast is unknown, so it cannot be dropped." +
                                                            st.leave_broken(req.group_name));
  }
  if (refused.empty()) {
    try {
      transfer::check_announcement(*st.setup.pipeline, a);
    } catch (const std::exception& e) {
      refused = describe(e);
    }
  }
  const auto t0 = clock::now();
  std::shared_ptr<transfer::received_weights> set;
  if (refused.empty()) {
    try {
      set = transfer::receive_announced(group, a, "distributed group '" + req.group_name + "'");
    } catch (const transfer::transfer_error& e) {
      return msg::make_error(refit_errc::transfer_failed, std::string(e.what()) + "." + st.leave_broken(req.group_name));
    } catch (const std::exception& e) {  // no room for the buffers: nothing was posted
      refused = "no room to receive " + std::to_string(a.bytes() / 1000000) + " MB on " + group.device().str() + ": " + describe(e);
    }
  }
  if (!refused.empty()) {
    // The trainer is broadcasting what it announced: take it and drop it, so its broadcasts complete and
    // the group stays usable.
    try {
      transfer::drain_announced(group, a);
      spdlog::warn("{}: refused an update on group '{}' and dropped its {:.1f} MB: {}", st.worker(), req.group_name, a.bytes() / 1e6, refused);
      return msg::make_error(refit_errc::invalid_request, refused + ". The trainer's broadcast (" + std::to_string(a.tensors.size()) +
                                                              " tensor(s), " + std::to_string(a.bytes() / 1000000) +
                                                              " MB) was received and dropped; group '" + req.group_name + "' is still usable.");
    } catch (const transfer::transfer_error& e) {
      return msg::make_error(refit_errc::transfer_failed, refused + ". Dropping the broadcast failed too: " + e.what() + "." +
                                                              st.leave_broken(req.group_name));
    } catch (const std::exception& e) {
      return msg::make_error(refit_errc::transfer_failed, refused + ". No room to drop the broadcast either (" + describe(e) + ")." +
                                                              st.leave_broken(req.group_name));
    }
  }
  msg::receive_report r;
  r.worker = st.setup.index;
  r.tensors = a.tensors.size();
  r.bytes = a.bytes();
  r.seconds = since(t0);
  st.setup.received->put(req.update, std::move(set));
  spdlog::info("{}: received {} tensor(s), {:.1f} MB, on group '{}'{} in {:.3f} s ({:.2f} GB/s)", st.worker(), r.tensors, r.bytes / 1e6,
               req.group_name, a.flattened_bucket ? " (one flattened bucket)" : "", r.seconds,
               r.seconds > 0 ? r.bytes / r.seconds / 1e9 : 0.0);
  return r;
}

}  // namespace

msg::transfer_actor spawn_transfer_actor(caf::actor_system& sys, transfer_setup setup) {
  auto st = std::make_shared<transfer_state>();
  st->setup = std::move(setup);
  return sys.spawn<caf::detached>([st](msg::transfer_actor::pointer) -> msg::transfer_actor::behavior_type {
    return {
        [st](msg::join_group_atom, const msg::group_request& req, int32_t rank) { return join(*st, req, rank); },
        [st](msg::leave_group_atom, const std::string& name) { return leave(*st, name); },
        [st](msg::receive_atom, const msg::receive_request& req) {
          c10::InferenceMode inference;
          return receive(*st, req);
        },
        [st](msg::release_atom, uint64_t update, bool empty_cache) {
          const bool had = st->setup.received->release(update);
          if (empty_cache) update::release_cached_device_memory(st->setup.pipeline->placement().device);
          return had;
        },
    };
  });
}

}  // namespace refit::actors
