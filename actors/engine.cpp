#include "actors/engine.hpp"

#include <c10/core/InferenceMode.h>
#include <spdlog/spdlog.h>

#include <chrono>

#include "actors/cache_actor.hpp"
#include "actors/module_actor.hpp"
#include "actors/module_supervisor.hpp"
#include "actors/offload_manager.hpp"
#include "actors/scheduler.hpp"
#include "actors/transfer_actor.hpp"
#include "actors/worker_actor.hpp"
#include "pipeline/lora/adapter.hpp"
#include "pipeline/models/layer_offload.hpp"
#include "pipeline/pipeline.hpp"
#include "pipeline/transfer/received_weights.hpp"
#include "pipeline/update/checkpoint_source.hpp"
#include "pipeline/update/module_updater.hpp"
#include "pipeline/weights/device_loader.hpp"
#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::actors {

namespace {

struct loaded_worker {
  std::shared_ptr<pipeline::diffusion_pipeline> pipe;
  std::shared_ptr<weights::device_loader> loader;  // the GPU fast path, null on CPU
};

loaded_worker load(const engine_config& config, size_t index) {
  c10::InferenceMode inference;
  const auto t0 = std::chrono::steady_clock::now();
  const std::string& device = config.devices[index];
  const models::placement where = models::parse_placement(device, config.dtype);
  loaded_worker w;
  if (where.device.is_cuda()) {
    const auto ring = weights::choose_staging_geometry();
    spdlog::info("worker {}: staging ring {} x {} MiB pinned, {} reader threads ({})", index, ring.slots, ring.slot_bytes >> 20, ring.threads,
                 ring.source);
    w.loader = std::make_shared<weights::device_loader>(where.device.has_index() ? where.device.index() : 0, ring);
  }
  w.pipe = pipeline::open_pipeline(config.model_path, where, {config.dit_layerwise_offload, config.dit_offload_prefetch_size});
  w.pipe->load_weights(std::nullopt, w.loader.get());
  for (const auto& m : w.pipe->module_names())
    if (const auto* off = w.pipe->offload(m)) {
      const auto i = off->info();
      spdlog::info("worker {}: layerwise offload of {} {} blocks: {:.1f} MB in host memory{}, {} device slots of {:.1f} MB (prefetch {})",
                   index, i.layers, m, i.host_bytes / 1e6, where.device.is_cuda() ? " (pinned)" : "", i.slots, i.device_bytes / 1e6 / i.slots,
                   i.prefetch_size);
    }
  spdlog::info("worker {}: {} on {} ready in {:.2f} s", index, w.pipe->class_name(), device,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return w;
}

// One module state per weight-bearing module: its update core, starting from the folder it was loaded from.
std::map<std::string, std::shared_ptr<module_state>> module_states(const loaded_worker& w, int32_t index,
                                                                   const std::shared_ptr<transfer::received_table>& received,
                                                                   const std::shared_ptr<lora::adapter_store>& adapters,
                                                                   const std::shared_ptr<const path_map>& paths) {
  std::map<std::string, std::shared_ptr<module_state>> out;
  const auto& layout = w.pipe->layout();
  for (const auto& m : w.pipe->module_names()) {
    const auto* c = layout.find(m);
    auto loaded_from = std::make_shared<update::checkpoint_source>(c->dir);
    out[m] = make_module_state(std::make_shared<update::module_updater>(w.pipe, m, index, std::move(loaded_from), w.loader), received, adapters);
    out[m]->paths = paths;
    spdlog::info("worker {}: loaded module {} ({}) from {}", index, m, c->class_name, c->dir.string());
  }
  return out;
}

// One small generation on each worker, one worker after the other, before any request: the first generation on a
// thread initialises libtorch's per-thread CUDA state (cuBLAS handles and workspaces, lazily loaded kernels), and two
// workers doing that at the same moment were seen to compute a different first image on one of them (2 x H200). It
// also takes that first-use latency off the first client's request.
void warm_up(caf::actor_system& sys, const std::vector<worker_actors>& workers) {
  caf::scoped_actor self{sys};
  msg::generation_request r;
  r.prompts = {"warm-up"};
  r.width = r.height = 64;
  r.steps = 1;
  for (size_t i = 0; i < workers.size(); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    self->request(workers[i].worker, std::chrono::minutes(10), msg::generate_atom::value, r)
        .receive(
            [&](msg::generation_result&) {
              spdlog::info("worker {}: warmed up (one 64x64 step) in {:.2f} s", i,
                           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
            },
            [&](caf::error& e) { spdlog::warn("worker {}: warm-up generation failed: {}", i, msg::describe(e)); });
  }
}

}  // namespace

worker_set spawn_workers(caf::actor_system& sys, const engine_config& config) {
  if (config.devices.empty()) throw std::invalid_argument("the engine needs at least one device");
  // Every device loads before any actor exists: a failure leaves nothing running.
  std::vector<loaded_worker> loaded;
  for (size_t i = 0; i < config.devices.size(); ++i) loaded.push_back(load(config, i));
  worker_set out;
  const auto& first = *loaded.front().pipe;
  out.class_name = first.class_name();
  out.modules = first.module_names();
  out.denoiser = first.denoiser();
  out.adapters = std::make_shared<lora::adapter_store>();
  for (const auto& m : out.modules) out.loaded[m] = msg::weight_source{msg::source_kind::checkpoint, first.layout().find(m)->dir.string(), 0, {}, {}, false, -1, {}};
  const auto paths = config.paths.prefixes.empty() ? nullptr : std::make_shared<const path_map>(config.paths);
  std::vector<std::shared_ptr<transfer::received_table>> received;
  std::vector<std::map<std::string, std::shared_ptr<module_state>>> states;
  for (size_t i = 0; i < loaded.size(); ++i) {
    received.push_back(std::make_shared<transfer::received_table>());
    states.push_back(module_states(loaded[i], static_cast<int32_t>(i), received.back(), out.adapters, paths));
  }
  // Each module knows its siblings on the other workers: a disk update reads the files once per process.
  for (const auto& m : out.modules)
    for (size_t i = 0; i < states.size(); ++i) {
      auto siblings = std::make_shared<std::map<int32_t, std::shared_ptr<update::module_updater>>>();
      for (size_t j = 0; j < states.size(); ++j)
        if (j != i) (*siblings)[static_cast<int32_t>(j)] = states[j].at(m)->core;
      states[i].at(m)->siblings = std::move(siblings);
    }
  for (size_t i = 0; i < loaded.size(); ++i) {
    const auto index = static_cast<int32_t>(i);
    const loaded_worker& w = loaded[i];
    worker_actors a;
    a.device = config.devices[i];
    a.cancel = std::make_shared<std::atomic<bool>>(false);
    a.cache = spawn_cache_actor(sys, index);
    a.supervisor = spawn_module_supervisor(sys, index, std::move(states[i]));
    a.transfer = spawn_transfer_actor(sys, {index, w.pipe, received[i], config.weight_sync_timeout});
    a.worker = spawn_worker(sys, {index, w.pipe, a.cache, a.cancel});
    for (const auto& m : out.modules)
      if (w.pipe->offload(m)) a.offloads.push_back(spawn_offload_manager(sys, index, w.pipe, m));
    out.workers.push_back(std::move(a));
  }
  warm_up(sys, out.workers);
  return out;
}

msg::scheduler_actor spawn_engine(caf::actor_system& sys, const engine_config& config) {
  worker_set set = spawn_workers(sys, config);
  scheduler_setup setup;
  setup.model_path = config.model_path.string();
  setup.modules = set.modules;
  setup.denoiser = set.denoiser;
  setup.class_name = set.class_name;
  setup.adapters = set.adapters;
  setup.served = set.loaded;
  setup.check_finite = config.check_finite;
  setup.worker_secret = config.worker_secret;
  setup.read_once = config.read_once;
  // Resolved once: the roots a weight source carries are the canonical folders files are opened beneath.
  for (const auto& r : weights::file_scope(config.allowed_model_roots).roots()) setup.allowed_roots.push_back(r.string());
  for (auto& a : set.workers) {
    setup.devices.push_back(a.device);
    setup.cancels.push_back(a.cancel);
    setup.caches.push_back(a.cache);
    setup.supervisors.push_back(a.supervisor);
    setup.transfers.push_back(a.transfer);
    setup.workers.push_back(a.worker);
    for (auto& o : a.offloads) setup.offloads.push_back(o);
  }
  return spawn_scheduler(sys, std::move(setup));
}

}  // namespace refit::actors
