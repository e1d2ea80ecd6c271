// SGLang's colocated-trainer endpoints: POST /update_weights_from_tensor (tensors a trainer shares: torch's
// shared-memory segments on CPUs, CUDA IPC on GPUs, decoded by tensor_payload.hpp) and
// POST /update_weights_from_tensor_checker (per-tensor SHA-256 against the trainer's). Strict parsing: a field
// refit cannot honour is a bad_request naming it.
#pragma once

#include <map>
#include <string>
#include <string_view>

#include "messages/protocol.hpp"

namespace refit::net {

// serialized_named_tensors (required: one base64 payload, or one per worker), load_format (null or
// "flattened_bucket"), payload_gpu_uuids (one per payload), target_modules, weight_update_mode (null or
// "lora_merge", + lora_alpha, lora_rank); refit's weight_version, flush_cache, abort_all_requests, mode.
msg::update_request parse_tensor_update_request(std::string_view body);

struct checker_request {
  std::string target_module;
  std::map<std::string, std::string> expected;  // name -> hex SHA-256
};
// target_module (required), expected_named_tensors_sha256 (required, a non-empty object of strings).
checker_request parse_checker_request(std::string_view body);

// SGLang's verdict: {success, message} ("Verified module 'm' update for N tensor(s)." or "Module 'm' update
// weight check failed: missing K tensor(s): a, b; checksum mismatch for M tensor(s): ...").
std::pair<bool, std::string> check_tensor_hashes(const checker_request& request, const std::map<std::string, std::string>& actual);

}  // namespace refit::net
