// Reads a module's weights from disk into host tensors: preads spread over threads, straight into
// the tensors' storage (or through a small buffer when the dtype changes).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::weights {

struct host_load_options {
  std::optional<dtype> float_dtype;  // convert floating tensors to this dtype
  unsigned threads = 0;              // 0: hardware concurrency
  uint64_t chunk_bytes = 16u << 20;  // unit of work per pread
  // copy: fresh tensors filled by pread. mapped: tensors over private copy-on-write mappings of the
  // shards (no copy until a page is written; what Python's safetensors load_file does); tensors that
  // need a dtype conversion or sit misaligned in the file are copied anyway.
  enum class backing { copy, mapped } storage = backing::copy;
};

using named_tensors = std::vector<std::pair<std::string, at::Tensor>>;

// Tensors in ascending name order. Dtypes without a libtorch counterpart (F4, F6_*) are rejected.
named_tensors load_to_host(const module_weights& weights, const host_load_options& options = {});

// Reads every tensor of `weights` into existing contiguous CPU tensors (same names, shapes and held
// dtypes), so a loader that refits repeatedly reuses its memory instead of faulting in fresh pages.
void read_into(const module_weights& weights, const named_tensors& destinations, const host_load_options& options = {});

// libtorch's scalar type for a safetensors dtype; throws weight_error(unconvertible_dtype) when none.
c10::ScalarType to_scalar_type(dtype t);
// The safetensors dtype of a libtorch scalar type; throws weight_error(unconvertible_dtype) when none.
dtype from_scalar_type(c10::ScalarType t);

}  // namespace refit::weights
