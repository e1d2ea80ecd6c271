// Where and in which dtype a pipeline holds its weights, and the one place that parses the user's
// spellings of both (--device, --dtype) and names them back (bf16, fp16, fp32).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>
#include <string_view>
#include <vector>

#include "pipeline/weights/dtype.hpp"
#include "pipeline/weights/host_loader.hpp"

namespace refit::models {

struct placement {
  c10::ScalarType float_dtype = c10::kFloat;  // floating parameters and buffers are held in this dtype
  c10::Device device = c10::kCPU;
};

// device: cpu, cuda, cuda:N (a CUDA device needs a CUDA build and a GPU); dtype: bf16, fp16, fp32 (or
// their long spellings), empty: bf16 on CUDA, fp32 on CPU. Throws std::invalid_argument naming the
// flag's value: "dtype must be bf16, fp16 or fp32, got 'int4'".
placement parse_placement(std::string_view device, std::string_view dtype);
// --devices: "all" (every CUDA device: cuda:0, cuda:1, ...) or a comma-separated list of devices, each checked as
// parse_placement checks one (with `dtype`). Throws std::invalid_argument.
std::vector<std::string> parse_device_list(std::string_view list, std::string_view dtype);
// The floating dtype of a spelling (bf16, fp16, fp32, ...); throws like parse_placement.
c10::ScalarType parse_float_dtype(std::string_view dtype);

// bf16, fp16, fp32 for the floating dtypes refit holds; libtorch's name otherwise.
std::string dtype_label(c10::ScalarType t);
// PyTorch's name of a dtype, as str(tensor.dtype) prints it: torch.float32, torch.bfloat16, torch.int64, ...
std::string torch_dtype_name(c10::ScalarType t);
// The safetensors dtype a floating dtype is stored as (BF16, F16, F32).
weights::dtype stored_dtype(c10::ScalarType t);
// Reading options that convert floating tensors to the placement's dtype.
weights::host_load_options load_options(const placement& where);

}  // namespace refit::models
