// TeaCache (Liu et al., arXiv 2411.19108; TeaCache4FLUX): skip a DiT's blocks on steps whose first
// block's modulated input moved little since the last step, and reuse the last computed residual
// (the blocks' output minus their input) instead. The model computes the modulated input and applies
// the residual; the rule itself lives here.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <vector>

namespace refit::sampling {

struct teacache_config {
  // poly1d coefficients, highest power first, mapping the input's relative L1 change to the output's.
  // These are FLUX.1-dev's from the TeaCache reference code (ali-vilab/TeaCache): nobody has published
  // FLUX.2/Klein ones, so they stand in until a calibration is configured in teacache.json.
  std::vector<double> coefficients{4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01};
  double threshold = 0.25;  // the reference's 1.5x setting for FLUX.1

  // {"coefficients": [...], "threshold": x}; either key may be left out (the defaults above apply).
  static teacache_config from_file(const std::filesystem::path& teacache_json);
  double rescale(double rel_l1) const;
};

// One CFG branch of one request: lives only as long as the request, so it never outlives the weights
// it was computed with.
struct teacache_state {
  teacache_config config;
  int64_t num_steps = 0;                // the first and last step always compute
  int64_t step = 0;
  double accumulated = 0;               // rescaled rel-L1 summed since the last computed step
  at::Tensor previous_modulated_input;  // the first block's modulated input at the previous step
  at::Tensor previous_residual;         // the blocks' output minus their input, last time they ran
  // Per step, for reports and tests: rel-L1 of the modulated input (NaN on step 0) and the decision.
  std::vector<double> rel_l1;
  std::vector<bool> skipped;

  // One step's decision from the first block's modulated input: true when the blocks may be skipped
  // and previous_residual reused. Records the step's trace and advances the step counter.
  bool skip_step(const at::Tensor& modulated_input);
  int64_t skipped_steps() const;
};

}  // namespace refit::sampling
