// Reading a protocol enum from the wire: out-of-range values are an error, never a value the code does not know.
#pragma once

#include <caf/error.hpp>
#include <caf/sec.hpp>

#include <cstdint>
#include <string>

namespace refit::msg {

// Reads an enum's raw value from the wire; out of range is an error, and `out` keeps its value.
template <class Enum>
caf::error load_enum(Enum& out, uint8_t raw, Enum last, const char* what) {
  if (raw > static_cast<uint8_t>(last)) {
    std::string message = "invalid ";
    message += what;  // (GCC 12 warns, wrongly, about std::string("...") + what when this is inlined)
    return caf::make_error(caf::sec::invalid_argument, std::move(message));
  }
  out = static_cast<Enum>(raw);
  return caf::none;
}

}  // namespace refit::msg
