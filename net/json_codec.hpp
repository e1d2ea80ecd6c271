// The HTTP API's JSON bodies (DESIGN.md section 5) <-> the protocol's structs. Parsing is strict:
// every field is type-checked and a bad one throws bad_request naming it (the bridge answers 400);
// unknown fields are ignored and null means "not given". nlohmann/json stays inside the .cpp.
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
};
checksum_request parse_checksum_request(std::string_view body);

// POST /v1/images/generations
struct image_request {
  msg::generation_request generation;
  bool seed_given = false;  // otherwise the caller draws a random seed
};
image_request parse_image_request(std::string_view body);

// Replies. Failed updates keep SGLang's shape {success: false, message} plus weight_version.
std::string update_result_json(const msg::update_result& result);
std::string error_json(std::string_view message);
// OpenAI clients read {"error": {"message", "type"}}; success/message are kept for refit's own clients.
std::string openai_error_json(std::string_view message, std::string_view type);
std::string checksums_json(const std::map<std::string, std::string>& checksums);
std::string model_info_json(const msg::model_info& info);
std::string models_list_json(std::string_view model_path);
std::string image_result_json(const msg::generation_result& result, int64_t created_unix_s);
std::string health_json();

std::string base64_encode(const std::vector<uint8_t>& bytes);

}  // namespace refit::net
