// Element types of the safetensors format, with their on-disk codes and widths.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <optional>
#include <string_view>

namespace refit::weights {

enum class dtype : uint8_t {
  BOOL, U8, I8, I16, U16, I32, U32, I64, U64,
  F16, BF16, F32, F64, C64,
  F8_E4M3, F8_E5M2, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
  F6_E2M3, F6_E3M2, F4,
};

inline constexpr dtype all_dtypes[] = {
  dtype::BOOL, dtype::U8, dtype::I8, dtype::I16, dtype::U16, dtype::I32, dtype::U32, dtype::I64, dtype::U64,
  dtype::F16, dtype::BF16, dtype::F32, dtype::F64, dtype::C64,
  dtype::F8_E4M3, dtype::F8_E5M2, dtype::F8_E8M0, dtype::F8_E4M3FNUZ, dtype::F8_E5M2FNUZ,
  dtype::F6_E2M3, dtype::F6_E3M2, dtype::F4,
};

// The code written in headers and in the checksum record ("BF16", "F8_E4M3", ...).
std::string_view dtype_name(dtype t);
std::optional<dtype> parse_dtype(std::string_view code);

// Width of one element in bits; sub-byte types (F4, F6_*) are packed, so a tensor's byte length is
// numel * bits / 8 and must come out whole.
unsigned dtype_bits(dtype t);

// Floating types that refit converts between when a module holds another dtype than the file.
bool is_convertible_float(dtype t);

// Parses the user-facing spellings of a target dtype: bf16/bfloat16, fp16/f16/float16, fp32/f32/float32.
std::optional<dtype> parse_target_dtype(std::string_view spelling);

// torch's names of its dtypes, as trainers announce them (str(t.dtype) with or without "torch.": float32,
// float, bfloat16, half, int64, long, float8_e4m3fn, ...); nullopt for anything else.
std::optional<dtype> parse_torch_dtype(std::string_view name);

std::ostream& operator<<(std::ostream& os, dtype t);

}  // namespace refit::weights
