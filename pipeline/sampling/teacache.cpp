#include "pipeline/sampling/teacache.hpp"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <limits>
#include <stdexcept>

#include "pipeline/models/config_json.hpp"

namespace refit::sampling {

using json = nlohmann::json;

teacache_config teacache_config::from_file(const std::filesystem::path& path) {
  const json j = models::read_config_json(path);
  teacache_config c;
  if (auto it = j.find("coefficients"); it != j.end()) {
    if (!it->is_array() || it->empty() || !std::all_of(it->begin(), it->end(), [](const json& v) { return v.is_number(); }))
      throw std::runtime_error(path.string() + ": 'coefficients' must be a non-empty array of numbers (poly1d order, highest power first)");
    c.coefficients = it->get<std::vector<double>>();
  }
  if (auto it = j.find("threshold"); it != j.end()) {
    if (!it->is_number() || it->get<double>() < 0) throw std::runtime_error(path.string() + ": 'threshold' must be a number >= 0");
    c.threshold = it->get<double>();
  }
  return c;
}

double teacache_config::rescale(double x) const {
  double y = 0;
  for (double c : coefficients) y = y * x + c;  // Horner, as numpy.poly1d evaluates
  return y;
}

bool teacache_state::skip_step(const at::Tensor& modulated) {
  double rel = std::numeric_limits<double>::quiet_NaN();
  if (previous_modulated_input.defined())
    rel = ((modulated - previous_modulated_input).abs().mean() / previous_modulated_input.abs().mean()).item<double>();
  bool skip = false;
  const bool boundary = step == 0 || step == num_steps - 1 || !previous_residual.defined();
  if (boundary) {
    accumulated = 0;
  } else {
    accumulated += config.rescale(rel);
    if (accumulated < config.threshold) skip = true;
    else accumulated = 0;
  }
  previous_modulated_input = modulated;
  rel_l1.push_back(rel);
  skipped.push_back(skip);
  step = (step + 1) % std::max<int64_t>(num_steps, 1);
  return skip;
}

int64_t teacache_state::skipped_steps() const { return std::count(skipped.begin(), skipped.end(), true); }

}  // namespace refit::sampling
