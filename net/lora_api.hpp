// SGLang's LoRA endpoints: POST /v1/set_lora, /v1/merge_lora_weights, /v1/unmerge_lora_weights and
// GET /v1/list_loras, with SGLang's fields, defaults, success messages and reply shapes ({"status": "ok",
// "message"} on success, {"detail": "<what failed>: <why>"} on failure); replies add refit's
// weight_version. Parsing is strict (json_codec.hpp's rules): a field refit cannot honour is a
// bad_request naming it (merge_mode "dynamic": refit always merges).
#pragma once

#include <string>
#include <string_view>

#include "messages/protocol.hpp"

namespace refit::net {

// A parsed LoRA request and SGLang's success message for it.
struct lora_call {
  msg::lora_request request;
  std::string success_message;  // "Successfully set LoRA adapter(s): a, b (target: all, strength: 1.00, 0.50)"
};

// /v1/set_lora: lora_nickname (string or list, required), lora_path (string, null or list), target
// ("all"; a string, or one per adapter and then all equal), strength (1.0; number or list), merge_mode
// (null, "auto", "merge"), lora_alpha (null, positive integer, or list), weight_version (refit's).
lora_call parse_set_lora(std::string_view body);
// /v1/merge_lora_weights: target ("all"), strength (1.0), weight_version.
lora_call parse_merge_lora(std::string_view body);
// /v1/unmerge_lora_weights: target ("all"), weight_version.
lora_call parse_unmerge_lora(std::string_view body);

std::string lora_success_json(const std::string& message, const msg::update_result& result);
std::string lora_failure_json(const std::string& detail, const std::string& weight_version);
// {"loaded_adapters": [{"nickname", "path"}], "active": {"<module>": [{"nickname", "nicknames", "path",
// "merged", "mode", "strength", "strengths"}]}}
std::string lora_status_json(const msg::lora_status& status);
// /get_weights_checksum's reply ({"<module>": "<hex>"}) plus, while adapters are merged,
// "active_loras": {"<module>": [{"nickname", "path", "strength"}]}.
std::string checksums_with_loras_json(const std::map<std::string, std::string>& checksums, const msg::lora_status& status);

}  // namespace refit::net
