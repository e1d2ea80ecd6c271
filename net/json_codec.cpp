#include "net/json_codec.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <limits>

namespace refit::net {

using json = nlohmann::json;

namespace {

// Replies carry text that did not come from refit: parser messages quoting the request's bytes, file
// names. Bytes that are not UTF-8 become U+FFFD instead of failing the reply.
std::string text(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json parse_object(std::string_view body) {
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
const json* field(const json& o, const char* name) {
  auto it = o.find(name);
  return it == o.end() || it->is_null() ? nullptr : &*it;
}

[[noreturn]] void wrong(const char* name, const char* expected) {
  throw bad_request(std::string("field '") + name + "' must be " + expected);
}

std::optional<std::string> opt_string(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_string()) wrong(name, "a string");
  return v->get<std::string>();
}

std::optional<bool> opt_bool(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) wrong(name, "a boolean");
  return v->get<bool>();
}

// Integers only: 2.0 is a float in JSON and rejected, so a client's type bug shows up here.
std::optional<int64_t> opt_int(const json& o, const char* name, int64_t lo, int64_t hi, const char* expected) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_number_integer()) wrong(name, expected);
  if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(hi)) wrong(name, expected);
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi) wrong(name, expected);
  return x;
}

std::optional<uint64_t> opt_uint64(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_number_integer() || (!v->is_number_unsigned() && v->get<int64_t>() < 0)) wrong(name, "a non-negative integer");
  return v->get<uint64_t>();
}

std::optional<double> opt_number(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_number() || !std::isfinite(v->get<double>())) wrong(name, "a number");
  return v->get<double>();
}

std::optional<std::vector<std::string>> opt_strings(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_array()) wrong(name, "a list of strings or null");
  std::vector<std::string> out;
  for (const auto& e : *v) {
    if (!e.is_string()) wrong(name, "a list of strings or null");
    out.push_back(e.get<std::string>());
  }
  return out;
}

constexpr int64_t max_image_pixels = 2048 * 2048;

// "WIDTHxHEIGHT", digits only on both sides.
std::pair<int64_t, int64_t> parse_size(const std::string& s) {
  constexpr const char* expected = "\"WIDTHxHEIGHT\" with positive integers up to 8192, e.g. \"64x64\"";
  const auto x = s.find('x');
  auto number = [&](std::string_view d) -> int64_t {
    if (d.empty() || d.size() > 5) wrong("size", expected);
    int64_t n = 0;
    for (char c : d) {
      if (c < '0' || c > '9') wrong("size", expected);
      n = n * 10 + (c - '0');
    }
    if (n < 1 || n > 8192) wrong("size", expected);
    return n;
  };
  if (x == std::string::npos) wrong("size", expected);
  const int64_t w = number(std::string_view(s).substr(0, x)), h = number(std::string_view(s).substr(x + 1));
  // One request must not be able to exhaust the server's memory: today's image DiTs are trained up to about 4 megapixels.
  if (w * h > max_image_pixels)
    throw bad_request("field 'size' must be at most " + std::to_string(max_image_pixels) + " pixels per image (e.g. 2048x2048), got " + s);
  return {w, h};
}

}  // namespace

msg::update_request parse_update_request(std::string_view body) {
  const json o = parse_object(body);
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
  r.weight_version = opt_string(o, "weight_version").value_or("");
  const auto mode = msg::parse_update_mode(opt_string(o, "mode").value_or("auto"));
  if (!mode) wrong("mode", "one of \"auto\", \"staged\", \"in_place\"");
  r.mode = *mode;
  return r;
}

checksum_request parse_checksum_request(std::string_view body) {
  const json o = parse_object(body);
  checksum_request r;
  r.module_names = opt_strings(o, "module_names");
  r.worker = static_cast<int32_t>(opt_int(o, "worker", 0, std::numeric_limits<int32_t>::max(), "a non-negative integer").value_or(0));
  return r;
}

image_request parse_image_request(std::string_view body) {
  const json o = parse_object(body);
  image_request r;
  auto& g = r.generation;
  auto prompt = opt_string(o, "prompt");
  if (!prompt || prompt->empty()) throw bad_request("prompt is required");
  g.prompts = {std::move(*prompt)};
  g.images_per_prompt = opt_int(o, "n", 1, 8, "an integer between 1 and 8").value_or(1);
  if (auto size = opt_string(o, "size")) std::tie(g.width, g.height) = parse_size(*size);
  if (auto fmt = opt_string(o, "response_format"); fmt && *fmt != "b64_json")
    throw bad_request("field 'response_format' must be \"b64_json\" (refit returns images inline; got \"" + *fmt + "\")");
  g.steps = opt_int(o, "num_inference_steps", 1, 1000, "an integer between 1 and 1000").value_or(0);
  g.guidance_scale = opt_number(o, "guidance_scale").value_or(g.guidance_scale);
  if (auto seed = opt_uint64(o, "seed")) {
    g.seed = *seed;
    r.seed_given = true;
  }
  g.negative_prompt = opt_string(o, "negative_prompt").value_or("");
  g.enable_teacache = opt_bool(o, "enable_teacache").value_or(false);
  if (auto t = opt_number(o, "teacache_threshold")) {
    if (!(*t >= 0) || !std::isfinite(*t)) throw bad_request("field 'teacache_threshold' must be a finite number >= 0");
    g.teacache_threshold = *t;  // turns TeaCache on for this request
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

std::string openai_error_json(std::string_view message, std::string_view type) {
  return text(json{{"success", false}, {"message", message}, {"error", {{"message", message}, {"type", type}}}});
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
    modules.push_back(std::move(entry));
  }
  json out{{"model_path", info.model_path}, {"weight_version", info.weight_version}, {"modules", std::move(modules)}};
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

std::string models_list_json(std::string_view model_path) {
  return text(json{{"object", "list"}, {"data", json::array({{{"id", model_path}, {"object", "model"}, {"owned_by", "refit"}}})}});
}

std::string image_result_json(const msg::generation_result& r, int64_t created_unix_s) {
  json data = json::array();
  for (const auto& png : r.png_images) data.push_back({{"b64_json", base64_encode(png)}});
  json out{{"created", created_unix_s}, {"data", std::move(data)}, {"weight_version", r.weight_version},
           {"inference_time_s", r.inference_time_s}};
  if (r.teacache_calls) out["teacache"] = {{"transformer_calls", r.teacache_calls}, {"skipped", r.teacache_skipped}};
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
