// Strict JSON field reading for the HTTP API's codecs (internal to net/): every field type-checked, a bad one
// a bad_request naming it; null means "not given"; fields an endpoint does not know are refused by name.
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "messages/input_limits.hpp"
#include "messages/types.hpp"
#include "net/json_codec.hpp"

namespace refit::net::fields {

using json = nlohmann::json;

// Replies carry text that did not come from refit: parser messages quoting the request's bytes, file
// names. Bytes that are not UTF-8 become U+FFFD instead of failing the reply.
inline std::string text(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

inline json parse_object(std::string_view body) {
  json j;
  try {
    j = json::parse(body.begin(), body.end());
  } catch (const json::parse_error& e) {
    throw bad_request(std::string("request body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw bad_request("request body must be a JSON object");
  return j;
}

// The field's value, or nullptr when it is absent or null.
inline const json* field(const json& o, const char* name) {
  auto it = o.find(name);
  return it == o.end() || it->is_null() ? nullptr : &*it;
}

[[noreturn]] inline void wrong(const char* name, const char* expected) {
  throw bad_request(std::string("field '") + name + "' must be " + expected);
}

// A path or name must not hold a NUL byte: the system calls would read only the part before it.
inline const std::string& no_nul(const char* name, const std::string& value) {
  if (value.find('\0') != std::string::npos) throw bad_request(std::string("field '") + name + "' must not contain a NUL byte");
  return value;
}

// Free text (prompts), taken as it is.
inline std::optional<std::string> opt_text(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_string()) wrong(name, "a string");
  return v->get<std::string>();
}

// Every other string field (paths, names, options): without NUL bytes.
inline std::optional<std::string> opt_string(const json& o, const char* name) {
  auto s = opt_text(o, name);
  if (s) no_nul(name, *s);
  return s;
}

// weight_version: empty when absent; bounded and printable (messages/input_limits.hpp), since every reply
// and /metrics repeat it.
inline std::string opt_weight_version(const json& o) {
  std::string v = opt_text(o, "weight_version").value_or("");
  if (auto why = msg::label_problem("weight_version", v); !why.empty()) throw bad_request(why);
  return v;
}

// check_finite: refuse NaN/Inf in the new weights (true), accept them (false), or the server's default.
inline msg::finite_check opt_check_finite(const json& o) {
  const json* v = field(o, "check_finite");
  if (!v) return msg::finite_check::server_default;
  if (!v->is_boolean()) wrong("check_finite", "a boolean or null (the server's default, refit serve --check-finite)");
  return v->get<bool>() ? msg::finite_check::on : msg::finite_check::off;
}

inline std::optional<bool> opt_bool(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) wrong(name, "a boolean");
  return v->get<bool>();
}

// Integers only: 2.0 is a float in JSON and rejected, so a client's type bug shows up here.
inline std::optional<int64_t> opt_int(const json& o, const char* name, int64_t lo, int64_t hi, const char* expected) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_number_integer()) wrong(name, expected);
  if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(hi)) wrong(name, expected);
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi) wrong(name, expected);
  return x;
}

inline std::optional<uint64_t> opt_uint64(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_number_integer() || (!v->is_number_unsigned() && v->get<int64_t>() < 0)) wrong(name, "a non-negative integer");
  return v->get<uint64_t>();
}

inline std::optional<double> opt_number(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_number() || !std::isfinite(v->get<double>())) wrong(name, "a number");
  return v->get<double>();
}

inline std::optional<std::vector<std::string>> opt_strings(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_array()) wrong(name, "a list of strings or null");
  std::vector<std::string> out;
  for (const auto& e : *v) {
    if (!e.is_string()) wrong(name, "a list of strings or null");
    out.push_back(no_nul(name, e.get<std::string>()));
  }
  return out;
}

// SGLang's weight_update_mode ("lora_merge": the tensors a trainer sends are a LoRA adapter's A/B weights),
// lora_alpha and lora_rank, into `r` (target_modules already parsed: lora_merge takes one).
template <class Request>
void parse_lora_merge(const json& o, Request& r) {
  const auto update_mode = opt_string(o, "weight_update_mode");
  if (update_mode && *update_mode != "lora_merge") wrong("weight_update_mode", "null (replace the weights) or \"lora_merge\"");
  const auto alpha = opt_int(o, "lora_alpha", 1, std::numeric_limits<int32_t>::max(), "a positive integer or null");
  const auto rank = opt_int(o, "lora_rank", 1, std::numeric_limits<int32_t>::max(), "a positive integer or null");
  if (!update_mode) {
    if (alpha || rank) throw bad_request("fields 'lora_alpha' and 'lora_rank' need weight_update_mode \"lora_merge\"");
    return;
  }
  if (r.target_modules.size() > 1)  // SGLang's wording
    throw bad_request("LoRA IPC weight update requires exactly one target module per request");
  r.lora_merge = true;
  r.lora_alpha = static_cast<int32_t>(alpha.value_or(0));
  r.lora_rank = static_cast<int32_t>(rank.value_or(0));
}

// Refuses fields the endpoint does not take, naming them and listing the ones it does.
inline void only_known(const json& o, std::initializer_list<std::string_view> known) {
  std::string unknown;
  for (auto it = o.begin(); it != o.end(); ++it) {
    bool ok = false;
    for (auto k : known) ok |= it.key() == k;
    if (!ok) unknown += (unknown.empty() ? "'" : ", '") + it.key() + "'";
  }
  if (unknown.empty()) return;
  std::string list;
  for (auto k : known) list += (list.empty() ? "" : ", ") + std::string(k);
  throw bad_request("unknown field(s) " + unknown + " (this endpoint takes: " + list + ")");
}

}  // namespace refit::net::fields
