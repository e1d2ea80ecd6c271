#include "net/json_codec.hpp"

#include <algorithm>
#include <limits>
#include <tuple>

#include "net/json_fields.hpp"

namespace refit::net {

using namespace fields;

msg::update_request parse_update_request(std::string_view body) {
  const json o = parse_object(body);
  // SGLang's fields (model_path, flush_cache, target_modules) and refit's.
  only_known(o, {"model_path", "flush_cache", "target_modules", "weight_version", "abort_all_requests", "mode", "weight_update_mode",
                 "lora_alpha", "lora_rank", "check_finite"});
  msg::update_request r;
  auto path = opt_string(o, "model_path");
  if (!path || path->empty()) throw bad_request("model_path is required");
  r.model_path = std::move(*path);
  r.flush_cache = opt_bool(o, "flush_cache").value_or(true);
  r.abort_all_requests = opt_bool(o, "abort_all_requests").value_or(false);
  if (auto t = opt_strings(o, "target_modules")) {
    // The protocol reads an empty list as "every module"; a client sending [] meant something else.
    if (t->empty()) throw bad_request("field 'target_modules' must not be an empty list (null selects every module)");
    r.target_modules = std::move(*t);
  }
  r.weight_version = opt_weight_version(o);
  r.check_finite = opt_check_finite(o);
  const auto mode = msg::parse_update_mode(opt_string(o, "mode").value_or("auto"));
  if (!mode) wrong("mode", "one of \"auto\", \"staged\", \"in_place\"");
  r.mode = *mode;
  // weight_update_mode "lora_merge": model_path is a LoRA adapter to merge into the base (SGLang's field).
  parse_lora_merge(o, r);
  if (!r.lora_merge) return r;
  r.source = msg::source_kind::lora;
  r.adapters = {{r.model_path, r.model_path, 1.0, r.lora_alpha, false, r.lora_rank}};
  r.lora_merge = false;  // the adapter is read from disk, not received
  return r;
}

checksum_request parse_checksum_request(std::string_view body) {
  const json o = parse_object(body);
  only_known(o, {"module_names", "worker", "format"});
  checksum_request r;
  r.module_names = opt_strings(o, "module_names");
  r.worker = static_cast<int32_t>(opt_int(o, "worker", 0, std::numeric_limits<int32_t>::max(), "a non-negative integer").value_or(0));
  if (auto f = opt_string(o, "format")) {
    const auto format = msg::parse_checksum_format(*f);
    if (!format) wrong("format", "\"sglang\" (the default) or \"refit\"");
    r.format = *format;
  }
  return r;
}

std::string update_result_json(const msg::update_result& r) {
  if (!r.success) return text(json{{"success", false}, {"message", r.message}, {"weight_version", r.weight_version}});
  json modules = json::array();
  for (const auto& m : r.modules)
    modules.push_back({{"name", m.module}, {"worker", m.worker}, {"tensors", m.tensors}, {"bytes", m.bytes},
                       {"seconds", m.seconds}, {"path", msg::to_string(m.path)}, {"source_dir", m.source}});
  json timings = json::object();
  for (const auto& [phase, s] : r.timings) timings[phase] = s;
  const json out{{"success", true},
                 {"message", r.message},
                 {"weight_version", r.weight_version},
                 {"modules", std::move(modules)},
                 {"timings", std::move(timings)},
                 {"mode", msg::to_string(r.mode)},
                 {"mode_reason", r.mode_reason},
                 {"cache_flushed", r.cache_flushed},
                 {"aborted_requests", r.aborted_requests}};
  return text(out);
}

std::string error_json(std::string_view message) { return text(json{{"success", false}, {"message", message}}); }

std::string detail_error_json(std::string_view message) {
  return text(json{{"detail", message}, {"success", false}, {"message", message}});
}

std::string openai_error_json(std::string_view message, std::string_view type, std::string_view param, std::string_view code) {
  json error{{"message", message}, {"type", type}};
  if (!param.empty()) error["param"] = param;
  if (!code.empty()) error["code"] = code;
  return text(json{{"success", false}, {"message", message}, {"error", std::move(error)}});
}

std::string memory_result_json(const msg::memory_result& r) {
  return text(json{{"success", r.success},
                   {"sleeping", r.sleeping},
                   {"message", r.message},
                   {"moved_bytes", r.moved_bytes},
                   {"device_used_bytes_before", r.device_used_before},
                   {"device_used_bytes_after", r.device_used_after},
                   {"seconds", r.seconds}});
}

void parse_memory_request(std::string_view body) {
  if (body.find_first_not_of(" \t\r\n") == std::string_view::npos) return;  // SGLang's clients send no body
  const json o = parse_object(body);
  std::string fields;
  for (auto it = o.begin(); it != o.end(); ++it) fields += (fields.empty() ? "'" : ", '") + it.key() + "'";
  if (!fields.empty()) throw bad_request("this endpoint takes no fields, got " + fields + " (refit releases and resumes every weight)");
}

std::string checksums_json(const std::map<std::string, std::string>& checksums) { return text(json(checksums)); }

std::string model_info_json(const msg::model_info& info) {
  // Replies arrive in whatever order the module actors answer; sort so the output is stable.
  std::vector<const msg::module_info*> sorted;
  for (const auto& m : info.modules) sorted.push_back(&m);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return std::tie(a->worker, a->name) < std::tie(b->worker, b->name); });
  json modules = json::array();
  for (const auto* mp : sorted) {
    const auto& m = *mp;
    json entry{{"name", m.name}, {"class", m.class_name}, {"dtype", m.dtype}, {"device", m.device}, {"worker", m.worker},
               {"tensors", m.tensors}, {"bytes", m.bytes}, {"source_dir", m.source}};
    if (!m.problem.empty()) entry["problem"] = m.problem;  // the weights it holds are not known: update it
    if (!m.adapters.empty()) {                              // LoRA adapters merged into these weights
      json loras = json::array();
      for (const auto& a : m.adapters) loras.push_back({{"nickname", a.nickname}, {"path", a.path}, {"strength", a.strength}});
      entry["lora"] = std::move(loras);
      entry["lora_tensors"] = m.adapter_tensors;
    }
    modules.push_back(std::move(entry));
  }
  json out{{"model_path", info.model_path}, {"weight_version", info.weight_version}, {"modules", std::move(modules)},
           {"sleeping", info.sleeping}};
  json workers = json::array();
  for (const auto& w : info.workers) {
    json entry{{"worker", w.index}, {"device", w.device}, {"status", w.status}};
    if (!w.host.empty()) entry["host"] = w.host;  // joined from another process (refit worker --join)
    workers.push_back(std::move(entry));
  }
  out["workers"] = std::move(workers);
  if (!info.offload.empty()) {
    std::vector<msg::offload_info> offload = info.offload;
    std::sort(offload.begin(), offload.end(), [](const auto& a, const auto& b) { return a.worker < b.worker; });
    json list = json::array();
    for (const auto& o : offload)
      list.push_back({{"worker", o.worker}, {"blocks", o.blocks}, {"prefetch_size", o.prefetch_size},
                      {"resident_blocks", o.resident_blocks}, {"host_bytes", o.host_bytes}, {"spare_host_bytes", o.spare_host_bytes},
                      {"device_bytes", o.device_bytes}, {"prefetches", o.prefetches}, {"prefetched_bytes", o.prefetched_bytes},
                      {"refreshes", o.refreshes}});
    out["layerwise_offload"] = std::move(list);
  }
  return text(out);
}

std::string health_json() { return R"({"status":"ok"})"; }

std::string base64_encode(const std::vector<uint8_t>& bytes) {
  static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    const uint32_t v = (uint32_t{bytes[i]} << 16) | (uint32_t{bytes[i + 1]} << 8) | bytes[i + 2];
    for (int s = 18; s >= 0; s -= 6) out.push_back(alphabet[(v >> s) & 63]);
  }
  if (const size_t rest = bytes.size() - i; rest > 0) {
    const uint32_t v = (uint32_t{bytes[i]} << 16) | (rest == 2 ? uint32_t{bytes[i + 1]} << 8 : 0u);
    out.push_back(alphabet[(v >> 18) & 63]);
    out.push_back(alphabet[(v >> 12) & 63]);
    out.push_back(rest == 2 ? alphabet[(v >> 6) & 63] : '=');
    out.push_back('=');
  }
  return out;
}

}  // namespace refit::net
