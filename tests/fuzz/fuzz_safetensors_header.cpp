// libFuzzer target: the safetensors header parser over arbitrary bytes taken as a whole file.
// Any exception other than weight_error, or any sanitizer report, is a bug.
#include <cstddef>
#include <cstdint>
#include <span>

#include "pipeline/weights/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto h = refit::weights::parse_header("fuzz-input", std::as_bytes(std::span(data, size)), size);
    // A header that passes must describe tensors that lie inside the input.
    for (const auto& t : h.tensors)
      if (h.data_offset + t.end > size) __builtin_trap();
  } catch (const refit::weights::weight_error&) {
  }
  return 0;
}
