#include "pipeline/weights/dtype.hpp"

#include <ostream>

namespace refit::weights {

namespace {
struct dtype_row {
  dtype type;
  std::string_view name;
  unsigned bits;
};
constexpr dtype_row rows[] = {
  {dtype::BOOL, "BOOL", 8},       {dtype::U8, "U8", 8},
  {dtype::I8, "I8", 8},           {dtype::I16, "I16", 16},
  {dtype::U16, "U16", 16},        {dtype::I32, "I32", 32},
  {dtype::U32, "U32", 32},        {dtype::I64, "I64", 64},
  {dtype::U64, "U64", 64},        {dtype::F16, "F16", 16},
  {dtype::BF16, "BF16", 16},      {dtype::F32, "F32", 32},
  {dtype::F64, "F64", 64},        {dtype::C64, "C64", 64},
  {dtype::F8_E4M3, "F8_E4M3", 8}, {dtype::F8_E5M2, "F8_E5M2", 8},
  {dtype::F8_E8M0, "F8_E8M0", 8}, {dtype::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
  {dtype::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
  {dtype::F6_E2M3, "F6_E2M3", 6}, {dtype::F6_E3M2, "F6_E3M2", 6},
  {dtype::F4, "F4", 4},
};
}  // namespace

std::string_view dtype_name(dtype t) { return rows[static_cast<size_t>(t)].name; }

unsigned dtype_bits(dtype t) { return rows[static_cast<size_t>(t)].bits; }

std::optional<dtype> parse_dtype(std::string_view code) {
  for (const auto& r : rows)
    if (r.name == code) return r.type;
  return std::nullopt;
}

bool is_convertible_float(dtype t) {
  switch (t) {
    case dtype::F16: case dtype::BF16: case dtype::F32: case dtype::F64:
    case dtype::F8_E4M3: case dtype::F8_E5M2:
      return true;
    default:
      return false;
  }
}

std::optional<dtype> parse_target_dtype(std::string_view s) {
  if (s == "bf16" || s == "bfloat16" || s == "BF16") return dtype::BF16;
  if (s == "fp16" || s == "f16" || s == "float16" || s == "F16") return dtype::F16;
  if (s == "fp32" || s == "f32" || s == "float32" || s == "F32") return dtype::F32;
  return std::nullopt;
}

std::optional<dtype> parse_torch_dtype(std::string_view s) {
  if (s.substr(0, 6) == "torch.") s.remove_prefix(6);
  static constexpr std::pair<std::string_view, dtype> names[] = {
      {"float32", dtype::F32}, {"float", dtype::F32}, {"float64", dtype::F64}, {"double", dtype::F64},
      {"float16", dtype::F16}, {"half", dtype::F16}, {"bfloat16", dtype::BF16},
      {"uint8", dtype::U8}, {"int8", dtype::I8}, {"int16", dtype::I16}, {"short", dtype::I16},
      {"uint16", dtype::U16}, {"int32", dtype::I32}, {"int", dtype::I32}, {"uint32", dtype::U32},
      {"int64", dtype::I64}, {"long", dtype::I64}, {"uint64", dtype::U64}, {"bool", dtype::BOOL},
      {"complex64", dtype::C64}, {"cfloat", dtype::C64},
      {"float8_e4m3fn", dtype::F8_E4M3}, {"float8_e5m2", dtype::F8_E5M2}, {"float8_e4m3fnuz", dtype::F8_E4M3FNUZ},
      {"float8_e5m2fnuz", dtype::F8_E5M2FNUZ}, {"float8_e8m0fnu", dtype::F8_E8M0},
  };
  for (const auto& [name, t] : names)
    if (s == name) return t;
  return std::nullopt;
}

std::ostream& operator<<(std::ostream& os, dtype t) { return os << dtype_name(t); }

}  // namespace refit::weights
