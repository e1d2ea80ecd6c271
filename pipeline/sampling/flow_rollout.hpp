// The rollout transition of flow-matching samplers for RL (Flow-GRPO semantics, as SGLang's diffusion
// engine serves /rollout/generate): each step is stochastic (SDE or CPS) or deterministic (ODE), and the
// log-probability of each stochastic step under the current policy is recorded, so a trainer can recompute
// it under new weights and form the policy ratio. The arithmetic follows SGLang 0.5.23's
// FlowRolloutController operation for operation, in fp32 (tests/oracle/test_rollout_oracle.py compares
// the two).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

namespace refit::sampling {

enum class sde_type : uint8_t { sde, cps, ode };
std::optional<sde_type> parse_sde_type(std::string_view name);  // "sde", "cps", "ode"

struct rollout_config {
  sde_type type = sde_type::sde;
  double noise_level = 0.7;
  bool log_prob_no_const = false;                     // log-prob without the Gaussian's constant and 1/(2 sigma^2)
  std::optional<std::vector<int64_t>> sde_steps;      // 0-based steps that are stochastic; nullopt: all
  bool debug = false;                                 // keep noises, means, std-devs and model outputs
  bool trajectory = false;                            // keep the latent entering each step (and the last)
  std::optional<std::vector<int64_t>> trajectory_steps;  // which of them (index T = the final latent); nullopt: all
};

// One request's rollout: the per-sample generators that drew its initial noise keep drawing the variance
// noise of the stochastic steps, [1, ...] per sample and step.
class flow_rollout {
 public:
  // sigmas: [T + 1] fp32 with the terminal 0; latents_shape: [B, ...] of the loop's latents.
  flow_rollout(rollout_config config, at::Tensor sigmas, std::vector<int64_t> latents_shape, std::vector<at::Generator> generators);

  // One denoising step: `model_output` the (guidance-combined) prediction, `sample` the latents entering the
  // step (any dtype; upcast to fp32 as the scheduler does). Returns the next latents in fp32; the caller
  // casts them to the model dtype, as the scheduler does.
  at::Tensor step(const at::Tensor& model_output, const at::Tensor& sample, int64_t step_index, float timestep);
  // The final latents, for the trajectory's last entry (index T).
  void finish(const at::Tensor& final_latents);

  int64_t steps() const { return static_cast<int64_t>(sigmas_.size(0)) - 1; }
  // Per sample [B, T]: each step's mean log-density of the drawn noise (0 on ODE steps).
  at::Tensor log_probs() const;
  // With debug: [B, T, ...] noises, means, model outputs; [B, T, 1] noise std-devs.
  at::Tensor variance_noises() const, prev_sample_means() const, noise_std_devs() const, model_outputs() const;
  // With trajectory: [B, K, ...] latents, [K] timesteps (the kept steps), and [T + 1] sigmas.
  at::Tensor trajectory_latents() const, trajectory_timesteps() const;
  const at::Tensor& sigmas() const { return sigmas_; }

 private:
  bool stochastic(int64_t step_index) const;
  bool keep_trajectory(int64_t index) const;
  at::Tensor draw_noise(const at::Tensor& like_fp32);

  rollout_config config_;
  at::Tensor sigmas_;
  double sigma_max_;
  std::vector<int64_t> latents_shape_;
  std::vector<at::Generator> generators_;
  std::vector<at::Tensor> log_prob_sums_, counts_;
  std::vector<at::Tensor> noises_, means_, stds_, outputs_;
  std::vector<at::Tensor> traj_latents_, traj_timesteps_;
};

}  // namespace refit::sampling
