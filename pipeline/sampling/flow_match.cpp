#include "pipeline/sampling/flow_match.hpp"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "pipeline/models/config_json.hpp"

#include <cmath>
#include <stdexcept>

namespace refit::sampling {

using json = nlohmann::json;

flow_match_config flow_match_config::from_file(const std::filesystem::path& path) {
  const json j = models::read_config_json(path);
  flow_match_config c;
  if (j.contains("num_train_timesteps")) c.num_train_timesteps = j["num_train_timesteps"].get<int64_t>();
  if (j.contains("shift")) c.shift = j["shift"].get<double>();
  if (j.contains("use_dynamic_shifting")) c.use_dynamic_shifting = j["use_dynamic_shifting"].get<bool>();
  if (j.contains("time_shift_type")) c.time_shift_type = j["time_shift_type"].get<std::string>();
  if (c.time_shift_type != "exponential" && c.time_shift_type != "linear")
    throw std::runtime_error(path.string() + ": time_shift_type '" + c.time_shift_type + "' is not supported");
  for (const char* flag : {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling"})
    if (j.contains(flag) && j[flag].is_boolean() && j[flag].get<bool>())
      throw std::runtime_error(path.string() + ": '" + flag + "' is not supported by refit's flow-match sampler");
  if (j.contains("shift_terminal") && !j["shift_terminal"].is_null())
    throw std::runtime_error(path.string() + ": 'shift_terminal' is not supported by refit's flow-match sampler");
  return c;
}

double compute_empirical_mu(int64_t image_seq_len, int64_t num_steps) {
  const double a1 = 8.73809524e-05, b1 = 1.89833333, a2 = 0.00016927, b2 = 0.45666666;
  const double n = static_cast<double>(image_seq_len);
  if (image_seq_len > 4300) return a2 * n + b2;
  const double m_200 = a2 * n + b2, m_10 = a1 * n + b1;
  const double a = (m_200 - m_10) / 190.0, b = m_200 - 200.0 * a;
  return a * static_cast<double>(num_steps) + b;
}

flow_match_schedule klein_schedule(const flow_match_config& c, int64_t n, int64_t image_seq_len) {
  if (n < 1) throw std::invalid_argument("num_inference_steps must be at least 1");
  // numpy.linspace(1.0, 1/n, n) in float64, then float32.
  std::vector<float> sig(static_cast<size_t>(n));
  const double start = 1.0, stop = 1.0 / static_cast<double>(n);
  const double step = n > 1 ? (stop - start) / static_cast<double>(n - 1) : 0.0;
  for (int64_t i = 0; i < n; ++i) sig[i] = static_cast<float>(static_cast<double>(i) * step + start);
  if (n > 1) sig[n - 1] = static_cast<float>(stop);

  if (c.use_dynamic_shifting) {
    const double mu = compute_empirical_mu(image_seq_len, n);
    // numpy evaluates the shift on a float32 array with Python floats taken as float32.
    const float e = static_cast<float>(c.time_shift_type == "exponential" ? std::exp(mu) : mu);
    for (auto& s : sig) {
      float x = 1.0f / s - 1.0f;
      s = e / (e + x);
    }
  } else {
    const float shift = static_cast<float>(c.shift);
    for (auto& s : sig) s = shift * s / (1.0f + (shift - 1.0f) * s);
  }
  flow_match_schedule out;
  for (float s : sig) out.timesteps.push_back(s * static_cast<float>(c.num_train_timesteps));
  out.sigmas = sig;
  out.sigmas.push_back(0.0f);
  return out;
}

at::Tensor euler_step(const at::Tensor& velocity, const at::Tensor& sample, float sigma, float sigma_next) {
  // diffusers: dt is a 0-dim float32 tensor, so dt * velocity stays in the velocity's dtype.
  at::Tensor dt = at::scalar_tensor(sigma_next, at::TensorOptions().dtype(at::kFloat)) -
                  at::scalar_tensor(sigma, at::TensorOptions().dtype(at::kFloat));
  at::Tensor prev = sample.to(at::kFloat) + dt.to(velocity.device()) * velocity;
  return prev.to(velocity.scalar_type());
}

}  // namespace refit::sampling
