// Element-wise conversion between floating dtypes, with the rounding libtorch uses (so a checksum of
// converted weights on disk equals the checksum of what a module holds after loading them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "pipeline/weights/dtype.hpp"

namespace refit::weights {

// The dtype a tensor stored as `stored` is held in when a module wants floats as `float_target`:
// convertible floats become the target, everything else (integers, bool, exotic floats) stays.
dtype held_dtype(dtype stored, std::optional<dtype> float_target);

// Converts `count` elements. `from` and `to` must both satisfy is_convertible_float, or be equal.
void convert_elements(dtype from, const std::byte* src, dtype to, std::byte* dst, uint64_t count);

}  // namespace refit::weights
