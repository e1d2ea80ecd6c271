#include "actors/worker_actor.hpp"

#include <c10/core/InferenceMode.h>

#include <chrono>

#include "pipeline/image/encode.hpp"
#include "pipeline/weights/host_loader.hpp"
#include "pipeline/weights/safetensors.hpp"
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

// A tensor as SGLang's rollout responses carry it.
msg::encoded_tensor encode(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU).contiguous();
  msg::encoded_tensor out;
  out.shape = c.sizes().vec();
  out.dtype = models::torch_dtype_name(c.scalar_type());
  out.safetensors = weights::encode_safetensors({"t", weights::from_scalar_type(c.scalar_type()), out.shape},
                                                {static_cast<const std::byte*>(c.data_ptr()), c.nbytes()});
  return out;
}

pipeline::rollout_params to_rollout(const msg::rollout_request& r, const std::atomic<bool>* cancel) {
  pipeline::rollout_params p;
  p.generation = to_params(r.generation, cancel);
  p.rollout = r.rollout;
  p.sampler.type = r.sde_type == msg::rollout_sde::cps ? sampling::sde_type::cps
                   : r.sde_type == msg::rollout_sde::ode ? sampling::sde_type::ode
                                                         : sampling::sde_type::sde;
  p.sampler.noise_level = r.noise_level;
  p.sampler.log_prob_no_const = r.log_prob_no_const;
  if (r.sde_steps_given) p.sampler.sde_steps = r.sde_step_indices;
  p.sampler.debug = r.debug;
  p.sampler.trajectory = r.return_dit_trajectory;
  if (r.return_steps_given) p.sampler.trajectory_steps = r.return_step_indices;
  p.denoising_env = r.return_denoising_env;
  return p;
}

msg::rollout_sample_result to_result(const pipeline::rollout_sample& s) {
  msg::rollout_sample_result out;
  out.generated_output = encode(s.image);
  if (s.log_probs.defined()) out.log_probs.push_back(encode(s.log_probs));
  for (const auto& [name, t] : s.debug) out.debug_tensors[name] = encode(t);
  for (const auto& [group, kwargs] : s.denoising_env)
    for (const auto& [name, tensors] : kwargs)
      for (const auto& t : tensors) out.denoising_env[group][name].push_back(encode(t));
  if (s.trajectory_latents.defined()) {
    out.dit_trajectory["latents"] = encode(s.trajectory_latents);
    out.dit_trajectory["timesteps"] = encode(s.trajectory_timesteps);
  }
  if (s.sigmas.defined()) out.dit_trajectory["sigmas"] = encode(s.sigmas);
  return out;
}

// Runs `body`, turning the pipeline's exceptions into the protocol's errors.
template <class Result, class F>
caf::result<Result> guarded_generation(F&& body) {
  try {
    return body();
  } catch (const pipeline::generation_cancelled& e) {
    return msg::make_error(refit_errc::cancelled, std::string("request aborted by a weight update (abort_all_requests): ") + e.what());
  } catch (const std::invalid_argument& e) {
    return msg::make_error(refit_errc::invalid_request, e.what());
  } catch (const std::exception& e) {
    return msg::make_error(refit_errc::generation_failed, std::string("generation failed: ") + e.what());
  }
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
          return guarded_generation<msg::generation_result>([&] {
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
          });
        },
        [w](msg::rollout_atom, const msg::rollout_request& r) -> caf::result<msg::rollout_result> {
          c10::InferenceMode inference;
          const auto t0 = std::chrono::steady_clock::now();
          return guarded_generation<msg::rollout_result>([&] {
            const auto samples = w->pipeline->rollout(to_rollout(r, w->cancel.get()));
            msg::rollout_result out;
            out.request_id = r.request_id;
            out.prompt = r.generation.prompts.empty() ? std::string() : r.generation.prompts.front();
            out.seed = r.generation.seed;
            for (const auto& s : samples) out.samples.push_back(to_result(s));
            out.inference_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            out.worker = w->index;
            return out;
          });
        },
    };
  });
}

}  // namespace refit::actors
