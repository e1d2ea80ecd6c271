// The HTTP API's JSON bodies (DESIGN.md section 5) <-> the protocol's structs, for refit's and SGLang's
// endpoints (the OpenAI image API is images_api.hpp). Parsing is strict: every field is type-checked, a
// bad one or one the endpoint does not take throws bad_request naming it (the bridge answers 400), and
// null means "not given". nlohmann/json stays inside the .cpp files.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "messages/protocol.hpp"

namespace refit::net {

// A request the client got wrong; its message is what the client reads.
struct bad_request : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// POST /update_weights_from_disk
msg::update_request parse_update_request(std::string_view body);

// POST /get_weights_checksum
struct checksum_request {
  std::optional<std::vector<std::string>> module_names;  // nullopt: every module
  int32_t worker = 0;
  msg::checksum_format format = msg::checksum_format::sglang;
};
checksum_request parse_checksum_request(std::string_view body);

// Replies. Failed updates keep SGLang's shape {success: false, message} plus weight_version.
std::string update_result_json(const msg::update_result& result);
std::string error_json(std::string_view message);
// SGLang's post-training routes answer errors as FastAPI does, {"detail": ...}; refit's fields come too.
std::string detail_error_json(std::string_view message);
// OpenAI clients read {"error": {"message", "type"[, "param", "code"]}}; success/message are kept for
// refit's own clients.
std::string openai_error_json(std::string_view message, std::string_view type, std::string_view param = {}, std::string_view code = {});
std::string checksums_json(const std::map<std::string, std::string>& checksums);
std::string model_info_json(const msg::model_info& info);
std::string health_json();

std::string base64_encode(const std::vector<uint8_t>& bytes);

// POST /release_memory_occupation and /resume_memory_occupation: no body (or {}); any field is refused.
void parse_memory_request(std::string_view body);
// SGLang's {"success", "sleeping", "message"} plus moved_bytes, device_used_bytes_before/after, seconds.
std::string memory_result_json(const msg::memory_result& result);

}  // namespace refit::net
