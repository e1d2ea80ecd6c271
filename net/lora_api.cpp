#include "net/lora_api.hpp"

#include <cmath>
#include <cstdio>
#include <limits>

#include "net/json_fields.hpp"

namespace refit::net {

using namespace fields;

namespace {

std::string two_decimals(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f", x);
  return buf;
}

// A field that is one value or a list of them (one per adapter): `n` values, or an error naming it.
template <class T, class One>
std::vector<T> one_or_list(const json& o, const char* name, size_t n, T fallback, One one) {
  const json* v = field(o, name);
  if (!v) return std::vector<T>(n, fallback);
  if (!v->is_array()) return std::vector<T>(n, one(*v));
  if (v->size() != n)
    throw bad_request("Length mismatch: lora_nickname has " + std::to_string(n) + " items, but " + name + " has " + std::to_string(v->size()) +
                      " items.");
  std::vector<T> out;
  for (const auto& e : *v) out.push_back(e.is_null() ? fallback : one(e));
  return out;
}

std::string target_field(const json& o, size_t n) {
  const auto targets = one_or_list<std::string>(o, "target", n, "all", [](const json& v) {
    if (!v.is_string()) wrong("target", "a string or a list of strings");
    return no_nul("target", v.get<std::string>());
  });
  for (const auto& t : targets)
    if (t != targets.front())
      throw bad_request("field 'target' names different targets per adapter; refit merges every adapter of a request into the same target");
  return targets.empty() ? "all" : targets.front();
}

double strength_of(const json& v) {
  if (!v.is_number() || !std::isfinite(v.get<double>())) wrong("strength", "a number or a list of numbers");
  return v.get<double>();
}

}  // namespace

lora_call parse_set_lora(std::string_view body) {
  const json o = parse_object(body);
  only_known(o, {"lora_nickname", "lora_path", "target", "strength", "merge_mode", "lora_alpha", "weight_version"});
  const json* nick = field(o, "lora_nickname");
  if (!nick) throw bad_request("field 'lora_nickname' is required");
  std::vector<std::string> names;
  if (nick->is_string()) names.push_back(no_nul("lora_nickname", nick->get<std::string>()));
  else if (nick->is_array())
    for (const auto& e : *nick) {
      if (!e.is_string()) wrong("lora_nickname", "a string or a list of strings");
      names.push_back(no_nul("lora_nickname", e.get<std::string>()));
    }
  else wrong("lora_nickname", "a string or a list of strings");
  if (names.empty()) throw bad_request("field 'lora_nickname' must name at least one adapter");
  for (const auto& n : names)
    if (n.empty()) throw bad_request("field 'lora_nickname' must not contain an empty name");
  const size_t n = names.size();
  const auto paths = one_or_list<std::string>(o, "lora_path", n, "", [](const json& v) {
    if (!v.is_string()) wrong("lora_path", "a string, null, or a list of them");
    return no_nul("lora_path", v.get<std::string>());
  });
  const auto strengths = one_or_list<double>(o, "strength", n, 1.0, strength_of);
  const auto alphas = one_or_list<int32_t>(o, "lora_alpha", n, 0, [](const json& v) {
    if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() > std::numeric_limits<int32_t>::max())
      throw bad_request("lora_alpha values must be positive integers or null");
    return static_cast<int32_t>(v.get<int64_t>());
  });
  if (auto mode = opt_string(o, "merge_mode"); mode && *mode != "auto" && *mode != "merge") {
    if (*mode == "dynamic")
      throw bad_request("merge_mode 'dynamic' is not supported: refit merges adapters into the weights (use null, \"auto\" or \"merge\")");
    throw bad_request("Invalid LoRA merge mode: " + *mode + ". Valid modes: ['auto', 'merge', 'dynamic']");
  }
  lora_call c;
  c.request.op = msg::lora_op::set;
  c.request.target = target_field(o, n);
  c.request.weight_version = opt_weight_version(o);
  for (size_t i = 0; i < n; ++i) c.request.adapters.push_back({names[i], paths[i], strengths[i], alphas[i], false});
  std::string nicknames, strength_text;
  for (size_t i = 0; i < n; ++i) {
    nicknames += (i ? ", " : "") + names[i];
    strength_text += (i ? ", " : "") + two_decimals(strengths[i]);
  }
  c.success_message = "Successfully set LoRA adapter(s): " + nicknames + " (target: " + c.request.target + ", strength: " + strength_text + ")";
  return c;
}

lora_call parse_merge_lora(std::string_view body) {
  const json o = parse_object(body);
  only_known(o, {"target", "strength", "weight_version"});
  lora_call c;
  c.request.op = msg::lora_op::merge;
  c.request.target = opt_string(o, "target").value_or("all");
  c.request.strength = opt_number(o, "strength").value_or(1.0);
  c.request.weight_version = opt_weight_version(o);
  // Python prints the float as given: 1.0, 0.25
  c.success_message = "Successfully merged LoRA weights (target: " + c.request.target + ", strength: " + json(c.request.strength).dump() + ")";
  return c;
}

lora_call parse_unmerge_lora(std::string_view body) {
  const json o = body.empty() ? json::object() : parse_object(body);
  only_known(o, {"target", "weight_version"});
  lora_call c;
  c.request.op = msg::lora_op::unmerge;
  c.request.target = opt_string(o, "target").value_or("all");
  c.request.weight_version = opt_weight_version(o);
  c.success_message = "Successfully unmerged LoRA weights (target: " + c.request.target + ")";
  return c;
}

std::string lora_success_json(const std::string& message, const msg::update_result& r) {
  json timings = json::object();
  for (const auto& [phase, s] : r.timings) timings[phase] = s;
  return text(json{{"status", "ok"}, {"message", message}, {"weight_version", r.weight_version}, {"refit_message", r.message}, {"timings", timings}});
}

std::string lora_failure_json(const std::string& detail, const std::string& weight_version) {
  return text(json{{"detail", detail}, {"weight_version", weight_version}});
}

std::string lora_status_json(const msg::lora_status& status) {
  json loaded = json::array();
  for (const auto& e : status.loaded) loaded.push_back({{"nickname", e.nickname}, {"path", e.path}});
  json active = json::object();
  for (const auto& [module, entries] : status.active) {
    if (entries.empty()) continue;
    std::string nickname, path;
    json nicknames = json::array(), strengths = json::array();
    for (size_t i = 0; i < entries.size(); ++i) {
      nickname += (i ? "," : "") + entries[i].nickname;
      path += (i ? "," : "") + entries[i].path;
      nicknames.push_back(entries[i].nickname);
      strengths.push_back(entries[i].strength);
    }
    active[module] = json::array({json{{"nickname", nickname},
                                       {"nicknames", nicknames},
                                       {"path", path},
                                       {"merged", true},
                                       {"mode", "merged"},
                                       {"strength", entries.front().strength},
                                       {"strengths", strengths}}});
  }
  return text(json{{"loaded_adapters", loaded}, {"active", active}});
}

std::string checksums_with_loras_json(const std::map<std::string, std::string>& checksums, const msg::lora_status& status) {
  json out(checksums);
  json active = json::object();
  for (const auto& [module, entries] : status.active) {
    if (!checksums.count(module)) continue;
    json list = json::array();
    for (const auto& e : entries) list.push_back({{"nickname", e.nickname}, {"path", e.path}, {"strength", e.strength}});
    active[module] = std::move(list);
  }
  if (!active.empty()) out["active_loras"] = std::move(active);
  return text(out);
}

}  // namespace refit::net
