#include "net/tensor_api.hpp"

#include <algorithm>
#include <limits>

#include "net/json_fields.hpp"
#include "net/tensor_payload.hpp"

namespace refit::net {

using namespace fields;

msg::update_request parse_tensor_update_request(std::string_view body) {
  const json o = parse_object(body);
  only_known(o, {"serialized_named_tensors", "load_format", "payload_gpu_uuids", "target_modules", "weight_update_mode", "lora_alpha",
                 "lora_rank", "weight_version", "flush_cache", "abort_all_requests", "mode", "check_finite"});
  msg::update_request r;
  r.source = msg::source_kind::tensor;
  const json* payloads = field(o, "serialized_named_tensors");
  if (!payloads || (payloads->is_array() && payloads->empty()) || (payloads->is_string() && payloads->get<std::string>().empty()))
    throw bad_request("serialized_named_tensors is required");
  if (!payloads->is_array()) throw bad_request("serialized_named_tensors must be a list");
  for (const auto& p : *payloads)
    if (!p.is_string()) throw bad_request("serialized_named_tensors must be a list of base64 strings");
  const auto format = opt_string(o, "load_format");
  if (format && *format != "flattened_bucket") wrong("load_format", "null (a list of (name, tensor)) or \"flattened_bucket\"");
  const auto uuids = opt_strings(o, "payload_gpu_uuids");
  if (uuids && uuids->size() != payloads->size())
    throw bad_request("payload_gpu_uuids needs one entry per payload, got " + std::to_string(uuids->size()) + " for " +
                      std::to_string(payloads->size()) + " payloads");
  for (size_t i = 0; i < payloads->size(); ++i) {
    r.payloads.push_back(decode_tensor_payload((*payloads)[i].get<std::string>(), format.has_value()));
    if (uuids) r.payloads.back().gpu_uuid = (*uuids)[i];
  }
  if (auto t = opt_strings(o, "target_modules")) {
    if (t->empty()) throw bad_request("field 'target_modules' must not be an empty list (null: the payload's modules, else the denoiser)");
    r.target_modules = std::move(*t);
  }
  parse_lora_merge(o, r);
  r.weight_version = opt_weight_version(o);
  r.check_finite = opt_check_finite(o);
  r.flush_cache = opt_bool(o, "flush_cache").value_or(true);
  r.abort_all_requests = opt_bool(o, "abort_all_requests").value_or(false);
  const auto mode = msg::parse_update_mode(opt_string(o, "mode").value_or("auto"));
  if (!mode) wrong("mode", "one of \"auto\", \"staged\", \"in_place\"");
  r.mode = *mode;
  return r;
}

checker_request parse_checker_request(std::string_view body) {
  const json o = parse_object(body);
  only_known(o, {"target_module", "expected_named_tensors_sha256"});
  checker_request r;
  auto module = opt_string(o, "target_module");
  if (!module || module->empty()) throw bad_request("target_module is required");
  r.target_module = std::move(*module);
  const json* expected = field(o, "expected_named_tensors_sha256");
  if (!expected || !expected->is_object() || expected->empty()) throw bad_request("expected_named_tensors_sha256 is required");
  for (const auto& [name, hex] : expected->items()) {
    if (!hex.is_string()) throw bad_request("expected_named_tensors_sha256['" + name + "'] must be a hex string");
    r.expected[name] = hex.get<std::string>();
  }
  return r;
}

std::pair<bool, std::string> check_tensor_hashes(const checker_request& request, const std::map<std::string, std::string>& actual) {
  std::vector<std::string> missing, mismatched;  // std::map iterates in name order, as SGLang sorts
  for (const auto& [name, hex] : request.expected) {
    auto it = actual.find(name);
    if (it == actual.end()) missing.push_back(name);
    else if (it->second != hex) mismatched.push_back(name);
  }
  auto names = [](const std::vector<std::string>& v) {
    std::string out;
    for (size_t i = 0; i < v.size() && i < 5; ++i) out += (i ? ", " : "") + v[i];
    if (v.size() > 5) out += ", ... (+" + std::to_string(v.size() - 5) + " more)";
    return out;
  };
  if (missing.empty() && mismatched.empty())
    return {true, "Verified module '" + request.target_module + "' update for " + std::to_string(request.expected.size()) + " tensor(s)."};
  std::string parts;
  if (!missing.empty()) parts += "missing " + std::to_string(missing.size()) + " tensor(s): " + names(missing);
  if (!mismatched.empty())
    parts += (parts.empty() ? "" : "; ") + std::string("checksum mismatch for ") + std::to_string(mismatched.size()) + " tensor(s): " +
             names(mismatched);
  return {false, "Module '" + request.target_module + "' update weight check failed: " + parts};
}

}  // namespace refit::net
