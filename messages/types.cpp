#include "messages/types.hpp"

#include <ostream>

namespace refit::msg {

std::string to_string(update_mode m) {
  switch (m) {
    case update_mode::auto_select: return "auto";
    case update_mode::staged: return "staged";
    case update_mode::in_place: return "in_place";
  }
  return "unknown(" + std::to_string(static_cast<int>(m)) + ")";
}

std::string to_string(write_path p) {
  switch (p) {
    case write_path::none: return "";
    case write_path::staged: return "staged";
    case write_path::in_place: return "in_place";
    case write_path::in_place_reread_undo: return "in_place(reread-undo)";
    case write_path::reread: return "reread";
    case write_path::mixed: return "mixed";
  }
  return "unknown(" + std::to_string(static_cast<int>(p)) + ")";
}

std::string to_string(source_kind k) {
  switch (k) {
    case source_kind::checkpoint: return "checkpoint";
    case source_kind::distributed: return "distributed";
    case source_kind::lora: return "lora";
    case source_kind::tensor: return "tensor";
  }
  return "unknown(" + std::to_string(static_cast<int>(k)) + ")";
}

std::string to_string(checksum_format f) { return f == checksum_format::refit ? "refit" : "sglang"; }

std::string to_string(image_format f) {
  switch (f) {
    case image_format::png: return "png";
    case image_format::jpeg: return "jpeg";
    case image_format::webp: return "webp";
  }
  return "unknown(" + std::to_string(static_cast<int>(f)) + ")";
}

std::string to_string(rollout_sde t) {
  switch (t) {
    case rollout_sde::sde: return "sde";
    case rollout_sde::cps: return "cps";
    case rollout_sde::ode: return "ode";
  }
  return "unknown(" + std::to_string(static_cast<int>(t)) + ")";
}

std::optional<checksum_format> parse_checksum_format(std::string_view text) {
  if (text == "sglang") return checksum_format::sglang;
  if (text == "refit") return checksum_format::refit;
  return std::nullopt;
}

std::optional<update_mode> parse_update_mode(std::string_view text) {
  for (auto m : {update_mode::auto_select, update_mode::staged, update_mode::in_place})
    if (to_string(m) == text) return m;
  return std::nullopt;
}

std::ostream& operator<<(std::ostream& os, update_mode m) { return os << to_string(m); }
std::ostream& operator<<(std::ostream& os, write_path p) { return os << to_string(p); }
std::ostream& operator<<(std::ostream& os, checksum_format f) { return os << to_string(f); }
std::ostream& operator<<(std::ostream& os, image_format f) { return os << to_string(f); }

}  // namespace refit::msg
