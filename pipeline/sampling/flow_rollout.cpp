#include "pipeline/sampling/flow_rollout.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace refit::sampling {

namespace {
const double log_sqrt_2pi = std::log(std::sqrt(2 * M_PI));
}

std::optional<sde_type> parse_sde_type(std::string_view name) {
  if (name == "sde") return sde_type::sde;
  if (name == "cps") return sde_type::cps;
  if (name == "ode") return sde_type::ode;
  return std::nullopt;
}

flow_rollout::flow_rollout(rollout_config config, at::Tensor sigmas, std::vector<int64_t> latents_shape, std::vector<at::Generator> generators)
    : config_(std::move(config)), sigmas_(sigmas.to(at::kFloat).contiguous()), latents_shape_(std::move(latents_shape)),
      generators_(std::move(generators)) {
  if (sigmas_.dim() != 1 || sigmas_.size(0) < 2) throw std::invalid_argument("rollout: sigmas must be [T + 1] with T >= 1");
  if (latents_shape_.empty() || static_cast<size_t>(latents_shape_[0]) != generators_.size())
    throw std::invalid_argument("rollout: one generator per sample is needed");
  // FlowGRPO's sigma_max: the second grid value, used in place of sigma == 1 so the SDE std never divides by 0.
  sigma_max_ = sigmas_[std::min<int64_t>(1, sigmas_.size(0) - 1)].item<double>();
  if (config_.type != sde_type::ode && !config_.log_prob_no_const && !(config_.noise_level > 0))
    throw std::invalid_argument("True log-probability computation requires a non-zero noise level.");
  if (config_.type == sde_type::ode && !config_.log_prob_no_const)
    throw std::invalid_argument("p_ode is always 0, true log_prob is meaningless, set rollout_log_prob_no_const to True to enable log_prob computation");
}

bool flow_rollout::stochastic(int64_t i) const {
  if (config_.type == sde_type::ode) return false;
  if (!config_.sde_steps) return true;
  return std::find(config_.sde_steps->begin(), config_.sde_steps->end(), i) != config_.sde_steps->end();
}

bool flow_rollout::keep_trajectory(int64_t i) const {
  if (!config_.trajectory) return false;
  if (!config_.trajectory_steps) return true;
  return std::find(config_.trajectory_steps->begin(), config_.trajectory_steps->end(), i) != config_.trajectory_steps->end();
}

// Each sample's generator draws that sample's noise, [1, ...] in fp32.
at::Tensor flow_rollout::draw_noise(const at::Tensor& like) {
  std::vector<int64_t> one = latents_shape_;
  one[0] = 1;
  std::vector<at::Tensor> rows;
  for (auto& g : generators_) rows.push_back(at::randn(one, g, at::TensorOptions().dtype(at::kFloat)));
  return at::cat(rows, 0).to(like.device());
}

at::Tensor flow_rollout::step(const at::Tensor& model_output_in, const at::Tensor& sample_in, int64_t i, float timestep) {
  if (i < 0 || i >= steps()) throw std::out_of_range("rollout: step " + std::to_string(i) + " outside the schedule");
  const auto dev = sample_in.device();
  const at::Tensor sigma = sigmas_[i].to(dev), sigma_next = sigmas_[i + 1].to(dev);
  const at::Tensor dt = sigma_next - sigma;
  at::Tensor sample = sample_in.to(at::kFloat);  // the scheduler upcasts before the transition
  if (keep_trajectory(i)) {
    traj_latents_.push_back(sample.to(at::kCPU));
    traj_timesteps_.push_back(at::scalar_tensor(timestep, at::TensorOptions().dtype(at::kFloat)));
  }
  at::Tensor model_output = model_output_in, next, mean, noise, noise_std, lp_nc;
  if (stochastic(i) && config_.type == sde_type::sde) {
    model_output = model_output.to(at::kFloat);
    noise = draw_noise(model_output);
    const at::Tensor sigma_tilde = at::where(at::isclose(sigma, at::ones_like(sigma)), at::scalar_tensor(sigma_max_, sigma.options()), sigma);
    const at::Tensor std_dev_t = at::sqrt(sigma / (1 - sigma_tilde)) * config_.noise_level;
    noise_std = std_dev_t * at::sqrt(-1 * dt);
    mean = sample * (1 + std_dev_t.pow(2) / (2 * sigma) * dt) + model_output * (1 + std_dev_t.pow(2) * (1 - sigma) / (2 * sigma)) * dt;
    next = mean + noise * noise_std;
    lp_nc = -((noise * noise_std).pow(2));
  } else if (stochastic(i) && config_.type == sde_type::cps) {
    model_output = model_output.to(at::kFloat);
    noise = draw_noise(model_output);
    const at::Tensor std_dev_t = sigma_next * std::sin(config_.noise_level * M_PI / 2);
    noise_std = std_dev_t;
    const at::Tensor x0 = sample - sigma * model_output;
    const at::Tensor x1 = sample + model_output * (1 - sigma);
    mean = x0 * (1 - sigma_next) + x1 * at::sqrt(sigma_next.pow(2) - std_dev_t.pow(2));
    next = mean + noise * noise_std;
    lp_nc = -((noise * noise_std).pow(2));
  } else {
    // The scheduler's own Euler update, dtypes untouched: bit-identical to sampling without a rollout.
    next = sample + dt * model_output;
    mean = next;
    noise = at::zeros_like(model_output);
    noise_std = at::zeros({}, model_output.options());
    lp_nc = at::zeros(latents_shape_, at::TensorOptions().dtype(at::kFloat).device(dev));
  }
  const int64_t b = lp_nc.size(0);
  std::vector<int64_t> reduce(lp_nc.dim() - 1);
  std::iota(reduce.begin(), reduce.end(), 1);
  const double count = static_cast<double>(lp_nc.numel() / std::max<int64_t>(b, 1));
  at::Tensor sum = (config_.log_prob_no_const || !stochastic(i))
                       ? lp_nc.sum(reduce)
                       : (lp_nc / (2 * noise_std.pow(2)) - at::log(noise_std) - log_sqrt_2pi).sum(reduce);
  log_prob_sums_.push_back(sum.to(at::kCPU));
  counts_.push_back(at::full({b}, count, at::TensorOptions().dtype(at::kFloat)));
  if (config_.debug) {
    noises_.push_back(noise.to(at::kCPU).clone());
    means_.push_back(mean.to(at::kCPU));
    stds_.push_back(noise_std.expand({b, 1}).to(at::kCPU));
    outputs_.push_back(model_output.to(at::kCPU));
  }
  return next;
}

void flow_rollout::finish(const at::Tensor& final_latents) {
  if (keep_trajectory(steps())) {
    traj_latents_.push_back(final_latents.to(at::kCPU));
    traj_timesteps_.push_back(at::zeros({}, at::TensorOptions().dtype(at::kFloat)));
  }
}

at::Tensor flow_rollout::log_probs() const { return at::stack(log_prob_sums_, 1) / at::stack(counts_, 1); }
at::Tensor flow_rollout::variance_noises() const { return at::stack(noises_, 1); }
at::Tensor flow_rollout::prev_sample_means() const { return at::stack(means_, 1); }
at::Tensor flow_rollout::noise_std_devs() const { return at::stack(stds_, 1); }
at::Tensor flow_rollout::model_outputs() const { return at::stack(outputs_, 1); }
at::Tensor flow_rollout::trajectory_latents() const { return traj_latents_.empty() ? at::Tensor() : at::stack(traj_latents_, 1); }
at::Tensor flow_rollout::trajectory_timesteps() const { return traj_timesteps_.empty() ? at::Tensor() : at::stack(traj_timesteps_, 0); }

}  // namespace refit::sampling
