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
                                                                   const std::shared_ptr<lora::adapter_store>& adapters) {
  std::map<std::string, std::shared_ptr<module_state>> out;
  const auto& layout = w.pipe->layout();
  for (const auto& m : w.pipe->module_names()) {
    const auto* c = layout.find(m);
    auto loaded_from = std::make_shared<update::checkpoint_source>(c->dir);
    out[m] = make_module_state(std::make_shared<update::module_updater>(w.pipe, m, index, std::move(loaded_from), w.loader), received, adapters);
    spdlog::info("worker {}: loaded module {} ({}) from {}", index, m, c->class_name, c->dir.string());
  }
  return out;
}

}  // namespace

msg::scheduler_actor spawn_engine(caf::actor_system& sys, const engine_config& config) {
  if (config.devices.empty()) throw std::invalid_argument("the engine needs at least one device");
  // Every device loads before any actor exists: a failure leaves nothing running.
  std::vector<loaded_worker> loaded;
  for (size_t i = 0; i < config.devices.size(); ++i) loaded.push_back(load(config, i));
  scheduler_setup setup;
  setup.model_path = config.model_path.string();
  setup.devices = config.devices;
  setup.modules = loaded.front().pipe->module_names();
  setup.denoiser = loaded.front().pipe->denoiser();
  setup.adapters = std::make_shared<lora::adapter_store>();
  setup.check_finite = config.check_finite;
  // Resolved once: the roots a weight source carries are the canonical folders files are opened beneath.
  for (const auto& r : weights::file_scope(config.allowed_model_roots).roots()) setup.allowed_roots.push_back(r.string());
  for (size_t i = 0; i < loaded.size(); ++i) {
    const auto index = static_cast<int32_t>(i);
    const loaded_worker& w = loaded[i];
    setup.cancels.push_back(std::make_shared<std::atomic<bool>>(false));
    setup.caches.push_back(spawn_cache_actor(sys, index));
    auto received = std::make_shared<transfer::received_table>();
    setup.supervisors.push_back(spawn_module_supervisor(sys, index, module_states(w, index, received, setup.adapters)));
    setup.transfers.push_back(spawn_transfer_actor(sys, {index, w.pipe, received, config.weight_sync_timeout}));
    setup.workers.push_back(spawn_worker(sys, {index, w.pipe, setup.caches.back(), setup.cancels.back()}));
    for (const auto& m : w.pipe->module_names())
      if (w.pipe->offload(m)) setup.offloads.push_back(spawn_offload_manager(sys, index, w.pipe, m));
  }
  return spawn_scheduler(sys, std::move(setup));
}

}  // namespace refit::actors
