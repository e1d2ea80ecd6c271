// Bounds on the text a client sends that refit repeats back (in every reply, in /metrics, in logs): checked
// by the HTTP codecs (400 naming the field) and again where requests enter the engine, so the actor port
// is held to the same rules.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace refit::msg {

// A weight_version holds at most this many bytes.
inline constexpr size_t max_label_bytes = 256;
// A LoRA adapter's nickname (derived weight_versions repeat it), which for a merge through
// update_weights_from_disk is the adapter's path: at most a path's length.
inline constexpr size_t max_nickname_bytes = 4096;

// Empty when `value` is an acceptable weight_version or adapter nickname: at most `max_bytes` of printable
// ASCII (0x20-0x7E) other than '"' and '\' (no control characters, no NUL, nothing that needs escaping in
// JSON or in a Prometheus label). Otherwise why not, naming `field` ("weight_version").
std::string label_problem(std::string_view field, std::string_view value, size_t max_bytes = max_label_bytes);

}  // namespace refit::msg
