#include "actors/worker_actor.hpp"

#include <c10/core/InferenceMode.h>

#include <chrono>

#include "pipeline/image/encode.hpp"
#include "pipeline/pipeline.hpp"

namespace refit::actors {

using msg::refit_errc;

namespace {

pipeline::generation_params to_params(const msg::generation_request& r, const std::atomic<bool>* cancel) {
  pipeline::generation_params p;
  p.prompts = r.prompts;
  p.negative_prompt = r.negative_prompt;
  p.width = r.width;
  p.height = r.height;
  p.steps = r.steps;
  p.guidance_scale = r.guidance_scale;
  p.seed = r.seed;
  p.seeds = r.seeds;
  p.images_per_prompt = r.images_per_prompt;
  p.cancel = cancel;
  p.teacache.enabled = r.enable_teacache || r.teacache_threshold >= 0;
  if (r.teacache_threshold >= 0) p.teacache.threshold = r.teacache_threshold;
  return p;
}

}  // namespace

msg::worker_actor spawn_worker(caf::actor_system& sys, worker_setup setup) {
  auto w = std::make_shared<worker_setup>(std::move(setup));
  if (!w->cancel) w->cancel = std::make_shared<std::atomic<bool>>(false);
  return sys.spawn<caf::detached>([w](msg::worker_actor::pointer) -> msg::worker_actor::behavior_type {
    return {
        [w](msg::generate_atom, const msg::generation_request& r) -> caf::result<msg::generation_result> {
          c10::InferenceMode inference;
          const auto t0 = std::chrono::steady_clock::now();
          const pipeline::generation_params p = to_params(r, w->cancel.get());
          try {
            pipeline::generation_stats stats;
            auto images = w->pipeline->generate(p, &stats);
            msg::generation_result out;
            const auto format = r.format == msg::image_format::jpeg ? image::format::jpeg
                                : r.format == msg::image_format::webp ? image::format::webp
                                                                      : image::format::png;
            const std::optional<int> compression = r.compression >= 0 ? std::optional<int>(r.compression) : std::nullopt;
            for (const auto& img : images)
              out.images.push_back(image::encode(img.pixels, static_cast<uint32_t>(img.width), static_cast<uint32_t>(img.height), format, compression));
            out.format = r.format;
            out.worker = w->index;
            out.inference_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (p.teacache.enabled) {
              out.teacache_calls = static_cast<uint64_t>(stats.dit_calls);
              out.teacache_skipped = static_cast<uint64_t>(stats.blocks_skipped);
              if (w->cache) caf::anon_send(w->cache, msg::teacache_atom::value, out.teacache_calls - out.teacache_skipped, out.teacache_skipped);
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
}

}  // namespace refit::actors
