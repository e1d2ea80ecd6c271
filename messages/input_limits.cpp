#include "messages/input_limits.hpp"

namespace refit::msg {

std::string label_problem(std::string_view field, std::string_view value, size_t max_bytes) {
  const std::string name(field);
  if (value.size() > max_bytes)
    return "field '" + name + "' is " + std::to_string(value.size()) + " bytes long; at most " + std::to_string(max_bytes) +
           " are allowed";
  for (size_t i = 0; i < value.size(); ++i) {
    const auto c = static_cast<unsigned char>(value[i]);
    if (c < 0x20 || c > 0x7E || c == '"' || c == '\\') {
      static const char* hex = "0123456789abcdef";
      const std::string code = {'0', 'x', hex[c >> 4], hex[c & 15]};
      return "field '" + name + "' holds the byte " + code + " at offset " + std::to_string(i) +
             "; only printable ASCII without '\"' and '\\' is allowed";
    }
  }
  return {};
}

}  // namespace refit::msg
