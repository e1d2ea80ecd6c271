#include "actors/worker_actor.hpp"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <spdlog/spdlog.h>

#include <chrono>

#include "actors/module_actor.hpp"
#include "actors/offload_manager.hpp"
#include "pipeline/flux2_klein.hpp"
#include "pipeline/models/layer_offload.hpp"
#include "pipeline/image/png.hpp"
#include "pipeline/weights/device_loader.hpp"
#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::actors {

using msg::refit_errc;

namespace {

models::placement placement_for(const worker_config& c) {
  models::placement where;
  where.device = at::Device(c.device);
  if (c.dtype.empty()) where.float_dtype = where.device.is_cuda() ? at::kBFloat16 : at::kFloat;
  else if (c.dtype == "bf16") where.float_dtype = at::kBFloat16;
  else if (c.dtype == "fp16") where.float_dtype = at::kHalf;
  else if (c.dtype == "fp32") where.float_dtype = at::kFloat;
  else throw std::invalid_argument("dtype must be bf16, fp16 or fp32, got '" + c.dtype + "'");
  return where;
}

struct worker_state {
  std::shared_ptr<pipeline::flux2_klein_pipeline> pipe;
  std::shared_ptr<std::atomic<bool>> cancel;
  int32_t index = 0;
  msg::cache_actor cache;
  std::map<std::string, std::shared_ptr<module_state>> states;
  std::map<std::string, msg::module_actor> modules;
};

}  // namespace

worker_handles spawn_worker(caf::actor_system& sys, const worker_config& config, std::shared_ptr<std::atomic<bool>> cancel) {
  auto st = std::make_shared<worker_state>();
  st->index = config.index;
  st->cache = config.cache;
  st->cancel = std::move(cancel);
  {
    c10::InferenceMode inference;
    auto t0 = std::chrono::steady_clock::now();
    const models::placement where = placement_for(config);
    std::shared_ptr<weights::device_loader> loader;
    if (where.device.is_cuda()) loader = std::make_shared<weights::device_loader>(where.device.has_index() ? where.device.index() : 0);
    st->pipe = std::make_shared<pipeline::flux2_klein_pipeline>(
        config.model_path, where, pipeline::offload_settings{config.dit_layerwise_offload, config.dit_offload_prefetch_size});
    st->pipe->load_weights(std::nullopt, loader.get());
    if (auto* off = st->pipe->transformer_offload()) {
      const auto i = off->info();
      spdlog::info("worker {}: layerwise offload of {} transformer blocks: {:.1f} MB in host memory{}, {} device slots of {:.1f} MB (prefetch {})",
                   config.index, i.layers, i.host_bytes / 1e6, where.device.is_cuda() ? " (pinned)" : "",
                   i.slots, i.device_bytes / 1e6 / i.slots, i.prefetch_size);
    }
    const auto& layout = st->pipe->layout();
    for (const auto& m : st->pipe->module_names()) {
      const auto* c = layout.find(m);
      st->states[m] = make_module_state(st->pipe, m, config.index, c->class_name, c->dir.string(), loader);
      spdlog::info("worker {}: loaded module {} ({}) from {}", config.index, m, c->class_name, c->dir.string());
    }
    spdlog::info("worker {}: pipeline on {} ready in {:.2f} s", config.index, config.device,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  worker_handles handles;
  if (st->pipe->transformer_offload()) handles.offload = spawn_offload_manager(sys, st->index, st->pipe);
  handles.modules = sys.spawn([st](msg::module_supervisor_actor::pointer self) -> msg::module_supervisor_actor::behavior_type {
    for (auto& [name, state] : st->states) {
      st->modules[name] = spawn_module_actor(self->system(), state);
      self->monitor(st->modules[name]);
    }
    self->set_down_handler([self, st](caf::down_msg& dm) {
      for (auto& [name, handle] : st->modules) {
        if (handle.address() != dm.source) continue;
        spdlog::warn("worker {}: module actor {} died ({}); respawning it", st->index, name, caf::to_string(dm.reason));
        handle = spawn_module_actor(self->system(), st->states[name]);
        self->monitor(handle);
      }
    });
    self->attach_functor([st](const caf::error&) {
      for (auto& [name, handle] : st->modules) caf::anon_send_exit(handle, caf::exit_reason::user_shutdown);
    });
    return {
        [st](msg::modules_atom) -> std::map<std::string, msg::module_actor> { return st->modules; },
        [st](msg::decide_atom, const std::string& module) -> caf::result<bool> {
          auto it = st->states.find(module);
          if (it == st->states.end()) return msg::make_error(refit_errc::module_not_found, "no module '" + module + "'");
          mark_decided(*it->second);
          return true;
        },
        // The module's actor once it is settled: the same one if it answers, else, when it is dead, a
        // replacement (spawned here if the down message has not arrived yet) after it has answered, i.e.
        // after its start-up has undone whatever commit its predecessor left unfinished.
        [self, st](msg::recover_atom, const std::string& module) -> caf::result<msg::module_actor> {
          auto it = st->modules.find(module);
          if (it == st->modules.end()) return msg::make_error(refit_errc::module_not_found, "no module '" + module + "'");
          auto promise = self->make_response_promise<msg::module_actor>();
          const msg::module_actor old = it->second;
          self->request(old, std::chrono::seconds(600), msg::info_atom::value)
              .then([promise, old](msg::module_info&) mutable { promise.deliver(old); },
                    [self, st, module, old, promise](caf::error& e) mutable {
                      // A live actor that does not answer may still be running on the module's state; a
                      // second actor on that state would race it. Only a dead one is replaced.
                      if (e == caf::sec::request_timeout) {
                        promise.deliver(msg::make_error(refit_errc::phase_failed, "module actor " + module + " of worker " +
                                                                                      std::to_string(st->index) +
                                                                                      " does not answer; it is not replaced while it may still run"));
                        return;
                      }
                      auto& handle = st->modules[module];
                      if (handle == old) {
                        spdlog::warn("worker {}: module actor {} is gone; respawning it", st->index, module);
                        handle = spawn_module_actor(self->system(), st->states[module]);
                        self->monitor(handle);
                      }
                      const msg::module_actor fresh = handle;
                      self->request(fresh, std::chrono::seconds(600), msg::info_atom::value)
                          .then(
                              [promise, fresh](msg::module_info& i) mutable {
                                if (i.problem.empty()) promise.deliver(fresh);
                                else promise.deliver(msg::make_error(refit_errc::phase_failed, i.problem));
                              },
                              [promise](caf::error& e) mutable { promise.deliver(std::move(e)); });
                    });
          return promise;
        },
    };
  });
  handles.worker = sys.spawn<caf::detached>([st](msg::worker_actor::pointer) -> msg::worker_actor::behavior_type {
    return {
        [st](msg::generate_atom, const msg::generation_request& r) -> caf::result<msg::generation_result> {
          c10::InferenceMode inference;
          auto t0 = std::chrono::steady_clock::now();
          pipeline::generation_params p;
          p.prompts = r.prompts;
          p.negative_prompt = r.negative_prompt;
          p.width = r.width;
          p.height = r.height;
          p.steps = r.steps;
          p.guidance_scale = r.guidance_scale;
          p.seed = r.seed;
          p.images_per_prompt = r.images_per_prompt;
          p.cancel = st->cancel.get();
          p.teacache.enabled = r.enable_teacache || r.teacache_threshold >= 0;
          if (r.teacache_threshold >= 0) p.teacache.threshold = r.teacache_threshold;
          try {
            pipeline::generation_stats stats;
            auto images = st->pipe->generate(p, &stats);
            msg::generation_result out;
            for (const auto& img : images)
              out.png_images.push_back(image::encode_png_rgb(img.pixels, static_cast<uint32_t>(img.width), static_cast<uint32_t>(img.height)));
            out.worker = st->index;
            out.inference_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (p.teacache.enabled) {
              out.teacache_calls = static_cast<uint64_t>(stats.transformer_calls);
              out.teacache_skipped = static_cast<uint64_t>(stats.blocks_skipped);
              if (st->cache) caf::anon_send(st->cache, msg::teacache_atom::value, out.teacache_calls - out.teacache_skipped, out.teacache_skipped);
            }
            return out;
          } catch (const pipeline::generation_cancelled& e) {
            return msg::make_error(refit_errc::cancelled, std::string("request aborted by a weight update (abort_all_requests): ") + e.what());
          } catch (const std::invalid_argument& e) {
            return msg::make_error(refit_errc::invalid_request, e.what());
          } catch (const std::exception& e) {
            return msg::make_error(refit_errc::generation_failed, std::string("generation failed: ") + e.what());
          }
        },
    };
  });
  return handles;
}

}  // namespace refit::actors
