#include "pipeline/weights/convert.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <cstring>
#include <stdexcept>
#include <string>

namespace refit::weights {

namespace {
c10::ScalarType scalar_type(dtype t) {
  switch (t) {
    case dtype::F16: return c10::ScalarType::Half;
    case dtype::BF16: return c10::ScalarType::BFloat16;
    case dtype::F32: return c10::ScalarType::Float;
    case dtype::F64: return c10::ScalarType::Double;
    case dtype::F8_E4M3: return c10::ScalarType::Float8_e4m3fn;
    case dtype::F8_E5M2: return c10::ScalarType::Float8_e5m2;
    default:
      throw std::invalid_argument("dtype " + std::string(dtype_name(t)) + " is not a convertible float");
  }
}
}  // namespace

dtype held_dtype(dtype stored, std::optional<dtype> float_target) {
  return float_target && is_convertible_float(stored) ? *float_target : stored;
}

void convert_elements(dtype from, const std::byte* src, dtype to, std::byte* dst, uint64_t count) {
  if (from == to) {
    std::memcpy(dst, src, count * (dtype_bits(from) / 8));
    return;
  }
  auto opts = at::TensorOptions().device(at::kCPU);
  const auto n = static_cast<int64_t>(count);
  at::Tensor in = at::from_blob(const_cast<std::byte*>(src), {n}, opts.dtype(scalar_type(from)));
  at::Tensor out = at::from_blob(dst, {n}, opts.dtype(scalar_type(to)));
  out.copy_(in);
}

}  // namespace refit::weights
