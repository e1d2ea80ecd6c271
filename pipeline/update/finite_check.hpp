// Refusing non-finite weights (NaN, +-Inf) before they are committed (refit serve --check-finite; an RL
// trainer that diverged must not have its weights served).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <optional>
#include <vector>

namespace refit::update {

// The index of the first tensor that holds a value that is not finite (tensors.size() in the unexpected case
// that the second pass finds none), or nullopt when every value is finite (integer and bool tensors always
// pass). Checked where the tensors live: each tensor's minimum and maximum (which propagate NaN) are
// reduced on its device and gathered into one flag per device, so the host waits once per device, not
// once per tensor; only when a flag is set does a second pass look for the first offending tensor.
std::optional<size_t> first_non_finite(const std::vector<at::Tensor>& tensors);

}  // namespace refit::update
