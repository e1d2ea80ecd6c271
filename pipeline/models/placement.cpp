#include "pipeline/models/placement.hpp"

#include <ATen/Context.h>

#include <algorithm>
#include <stdexcept>

namespace refit::models {

c10::ScalarType parse_float_dtype(std::string_view dtype) {
  if (auto d = weights::parse_target_dtype(dtype)) return weights::to_scalar_type(*d);
  throw std::invalid_argument("dtype must be bf16, fp16 or fp32, got '" + std::string(dtype) + "'");
}

placement parse_placement(std::string_view device, std::string_view dtype) {
  placement where;
  try {
    where.device = c10::Device(std::string(device));
  } catch (const std::exception&) {
    throw std::invalid_argument("device must be cpu, cuda or cuda:N, got '" + std::string(device) + "'");
  }
  if (!where.device.is_cpu() && !where.device.is_cuda())
    throw std::invalid_argument("device must be cpu, cuda or cuda:N, got '" + std::string(device) + "'");
  if (where.device.is_cuda() && !at::hasCUDA())
    throw std::invalid_argument("device '" + std::string(device) + "': this build or machine has no CUDA");
  if (where.device.is_cuda() && where.device.has_index() && static_cast<size_t>(where.device.index()) >= at::getNumGPUs())
    throw std::invalid_argument("device '" + std::string(device) + "': this machine has " + std::to_string(at::getNumGPUs()) + " CUDA device(s)");
  where.float_dtype = dtype.empty() ? (where.device.is_cuda() ? c10::kBFloat16 : c10::kFloat) : parse_float_dtype(dtype);
  return where;
}

std::vector<std::string> parse_device_list(std::string_view list, std::string_view dtype) {
  std::vector<std::string> out;
  if (list == "all") {
    if (!at::hasCUDA() || at::getNumGPUs() == 0) throw std::invalid_argument("devices 'all': this build or machine has no CUDA device");
    for (size_t i = 0; i < at::getNumGPUs(); ++i) out.push_back("cuda:" + std::to_string(i));
    return out;
  }
  size_t start = 0;
  while (start <= list.size()) {
    const size_t comma = std::min(list.find(',', start), list.size());
    const std::string_view one = list.substr(start, comma - start);
    if (one.empty()) throw std::invalid_argument("devices must be a comma-separated list like cuda:0,cuda:1 (or all), got '" + std::string(list) + "'");
    parse_placement(one, dtype);  // a typo or a missing GPU stops the server before it loads
    out.emplace_back(one);
    start = comma + 1;
  }
  return out;
}

std::string dtype_label(c10::ScalarType t) {
  switch (t) {
    case c10::kBFloat16: return "bf16";
    case c10::kHalf: return "fp16";
    case c10::kFloat: return "fp32";
    default: return c10::toString(t);
  }
}

std::string torch_dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "torch.float32";
    case c10::kDouble: return "torch.float64";
    case c10::kHalf: return "torch.float16";
    case c10::kBFloat16: return "torch.bfloat16";
    case c10::kLong: return "torch.int64";
    case c10::kInt: return "torch.int32";
    case c10::kShort: return "torch.int16";
    case c10::kChar: return "torch.int8";
    case c10::kByte: return "torch.uint8";
    case c10::kBool: return "torch.bool";
    default: return "torch." + std::string(c10::toString(t));
  }
}

weights::dtype stored_dtype(c10::ScalarType t) { return weights::from_scalar_type(t); }

weights::host_load_options load_options(const placement& where) {
  weights::host_load_options o;
  o.float_dtype = stored_dtype(where.float_dtype);
  return o;
}

}  // namespace refit::models
