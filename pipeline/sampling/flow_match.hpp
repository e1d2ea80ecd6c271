// FlowMatchEulerDiscreteScheduler as the FLUX.2-klein pipeline drives it: sigmas linspace(1, 1/N, N),
// shifted with the empirical mu (dynamic shifting), Euler steps on the velocity.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <string>
#include <vector>

namespace refit::sampling {

struct flow_match_config {
  int64_t num_train_timesteps = 1000;
  double shift = 1.0;
  bool use_dynamic_shifting = false;
  std::string time_shift_type = "exponential";  // or "linear"

  // Reads scheduler/scheduler_config.json; options refit does not implement (karras/exponential/beta
  // sigmas, shift_terminal, invert_sigmas, stochastic sampling) are refused by name.
  static flow_match_config from_file(const std::filesystem::path& config_json);
};

struct flow_match_schedule {
  std::vector<float> sigmas;     // N + 1 values, the last 0
  std::vector<float> timesteps;  // N values: sigma * num_train_timesteps
};

// diffusers' compute_empirical_mu of the Klein pipeline.
double compute_empirical_mu(int64_t image_seq_len, int64_t num_steps);

// The schedule Flux2KleinPipeline sets: float32 arithmetic where diffusers uses it, so the sigmas match bit for bit.
flow_match_schedule klein_schedule(const flow_match_config& config, int64_t num_steps, int64_t image_seq_len);

// One Euler step: sample + (sigma_next - sigma) * velocity, in float32, returned in the velocity's dtype.
at::Tensor euler_step(const at::Tensor& velocity, const at::Tensor& sample, float sigma, float sigma_next);

}  // namespace refit::sampling
