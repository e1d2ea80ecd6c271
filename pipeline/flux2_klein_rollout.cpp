// flux2_klein_pipeline::rollout: generation that records the sampler's trajectory and per-step
// log-probabilities (sampling::flow_rollout), sample by sample, for POST /rollout/generate.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>

#include "pipeline/flux2_klein.hpp"
#include "pipeline/models/flux2_transformer.hpp"

namespace refit::pipeline {

namespace {

// Sample i's slice of a batched [B, ...] tensor, on the CPU.
at::Tensor row(const at::Tensor& t, int64_t i) { return t[i].contiguous().to(at::kCPU); }

// Position ids as the sampler builds them (image tokens row-major, then text), for the rotary tables.
at::Tensor ids_for(int64_t h, int64_t w, int64_t text_len) {
  auto i64 = at::TensorOptions().dtype(at::kLong);
  const at::Tensor img = at::cartesian_prod({at::zeros({1}, i64), at::arange(h, i64), at::arange(w, i64), at::zeros({1}, i64)});
  const at::Tensor txt = at::cartesian_prod({at::zeros({1}, i64), at::zeros({1}, i64), at::zeros({1}, i64), at::arange(text_len, i64)});
  return at::cat({txt, img}, 0);
}

}  // namespace

std::vector<rollout_sample> flux2_klein_pipeline::rollout(const rollout_params& params) const {
  const generation_params& p = params.generation;
  if (p.prompts.size() != 1) throw std::invalid_argument("a rollout takes one prompt");
  if (p.images_per_prompt < 1) throw std::invalid_argument("num_outputs_per_prompt must be at least 1");
  if (!p.seeds.empty()) throw std::invalid_argument("a rollout draws sample i with seed + i; per-sample seeds are not taken");
  const int64_t width = p.width ? p.width : default_size(), height = p.height ? p.height : default_size();
  const int64_t multiple = vae_scale_factor() * 2;
  if (width <= 0 || height <= 0 || width % multiple || height % multiple)
    throw std::invalid_argument("image size " + std::to_string(width) + "x" + std::to_string(height) + " must be positive multiples of " +
                                std::to_string(multiple));
  const int64_t steps = p.steps ? p.steps : default_steps();
  if (steps < 1 || steps > 1000) throw std::invalid_argument("num_inference_steps must be between 1 and 1000");
  c10::InferenceMode inference;
  // This thread's current device is the pipeline's: anything that allocates or launches on "the current device"
  // (rather than on its inputs' device) must not land on GPU 0 for a worker on another GPU.
  c10::OptionalDeviceGuard on_device(where_.device.is_cuda() ? c10::optional<c10::Device>(where_.device) : c10::nullopt);

  const int64_t batch = p.images_per_prompt;
  at::Tensor embeds = encode_prompts(p.prompts).repeat_interleave(batch, 0);
  std::optional<at::Tensor> negative;
  if (!is_distilled_ && p.guidance_scale > 1.0) negative = encode_prompts({p.negative_prompt}).repeat_interleave(batch, 0);
  // Sample i: its own generator, seeded seed + i, draws its initial noise and then its steps' noise.
  std::vector<at::Generator> generators;
  std::vector<at::Tensor> noises;
  for (int64_t i = 0; i < batch; ++i) {
    generators.push_back(at::make_generator<at::CPUGeneratorImpl>(p.seed + static_cast<uint64_t>(i)));
    noises.push_back(initial_noise(1, height, width, generators.back()));
  }
  const at::Tensor noise = at::cat(noises, 0);
  const int64_t h = noise.size(2), w = noise.size(3), channels = noise.size(1);

  std::vector<rollout_sample> out(static_cast<size_t>(batch));
  if (!params.rollout) {
    const at::Tensor images = sample(noise, embeds, negative, steps, p.guidance_scale, p.cancel).to(at::kFloat);
    for (int64_t i = 0; i < batch; ++i) out[i].image = row(images, i);
    return out;
  }
  const auto schedule = sampling::klein_schedule(scheduler_, steps, h * w);
  const at::Tensor sigmas = at::tensor(schedule.sigmas, at::TensorOptions().dtype(at::kFloat));
  sampling::flow_rollout ctl(params.sampler, sigmas, {batch, h * w, channels}, generators);
  // Never with TeaCache: a skipped block changes the model output the log-probabilities are about.
  const at::Tensor images = sample(noise, embeds, negative, steps, p.guidance_scale, p.cancel, {}, nullptr, &ctl).to(at::kFloat);

  const at::Tensor log_probs = ctl.log_probs();
  at::Tensor noises_t, means, stds, outputs, traj, traj_t;
  if (params.sampler.debug) {
    noises_t = ctl.variance_noises(), means = ctl.prev_sample_means(), stds = ctl.noise_std_devs(), outputs = ctl.model_outputs();
  }
  if (params.sampler.trajectory) traj = ctl.trajectory_latents(), traj_t = ctl.trajectory_timesteps();
  std::pair<at::Tensor, at::Tensor> rope_tables;
  if (params.denoising_env) rope_tables = transformer_->rope(ids_for(h, w, embeds.size(1)).to(where_.device));
  for (int64_t i = 0; i < batch; ++i) {
    rollout_sample& s = out[i];
    s.image = row(images, i);
    s.log_probs = row(log_probs, i);
    if (params.sampler.debug)
      s.debug = {{"rollout_variance_noises", row(noises_t, i)},
                 {"rollout_prev_sample_means", row(means, i)},
                 {"rollout_noise_std_devs", row(stds, i)},
                 {"rollout_model_outputs", row(outputs, i)}};
    if (params.denoising_env) {
      const std::vector<at::Tensor> freqs{rope_tables.first.to(at::kCPU), rope_tables.second.to(at::kCPU)};
      s.denoising_env["pos_cond_kwargs"] = {{"encoder_hidden_states", {row(embeds, i)}}, {"freqs_cis", freqs}};
      if (negative) s.denoising_env["neg_cond_kwargs"] = {{"encoder_hidden_states", {row(*negative, i)}}, {"freqs_cis", freqs}};
    }
    if (traj.defined()) {
      s.trajectory_latents = row(traj, i);
      s.trajectory_timesteps = traj_t;
    }
    if (params.sampler.trajectory) s.sigmas = sigmas;
  }
  return out;
}

}  // namespace refit::pipeline
