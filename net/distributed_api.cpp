#include "net/distributed_api.hpp"

#include <limits>

#include "net/json_codec.hpp"
#include "net/json_fields.hpp"
#include "pipeline/weights/dtype.hpp"

namespace refit::net {

using namespace fields;

namespace {

std::string required_string(const json& o, const char* name) {
  auto v = opt_string(o, name);
  if (!v) throw bad_request(std::string("field '") + name + "' is required");
  return *v;
}

int32_t required_int(const json& o, const char* name, int64_t lo, int64_t hi, const char* expected) {
  auto v = opt_int(o, name, lo, hi, expected);
  if (!v) throw bad_request(std::string("field '") + name + "' is required");
  return static_cast<int32_t>(*v);
}

std::vector<std::string> required_strings(const json& o, const char* name) {
  auto v = opt_strings(o, name);
  if (!v) throw bad_request(std::string("field '") + name + "' is required");
  return *v;
}

std::vector<std::vector<int64_t>> required_shapes(const json& o) {
  const json* v = field(o, "shapes");
  if (!v) throw bad_request("field 'shapes' is required");
  if (!v->is_array()) wrong("shapes", "a list of shapes (lists of non-negative integers)");
  std::vector<std::vector<int64_t>> out;
  for (const auto& s : *v) {
    if (!s.is_array()) wrong("shapes", "a list of shapes (lists of non-negative integers)");
    std::vector<int64_t> shape;
    for (const auto& d : s) {
      if (!d.is_number_integer() || (!d.is_number_unsigned() && d.get<int64_t>() < 0) ||
          (d.is_number_unsigned() && d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())))
        throw bad_request("shapes[" + std::to_string(out.size()) + "] must be a list of non-negative integers");
      shape.push_back(d.get<int64_t>());
    }
    out.push_back(std::move(shape));
  }
  return out;
}

}  // namespace

msg::group_request parse_group_request(std::string_view body) {
  const json o = parse_object(body);
  only_known(o, {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"});
  msg::group_request r;
  r.master_address = required_string(o, "master_address");
  r.master_port = required_int(o, "master_port", 1, 65535, "a port number (1..65535)");
  r.rank_offset = required_int(o, "rank_offset", 1, std::numeric_limits<int32_t>::max(), "an integer >= 1 (rank 0 is the trainer)");
  r.world_size = required_int(o, "world_size", 2, std::numeric_limits<int32_t>::max(), "an integer >= 2");
  r.group_name = opt_string(o, "group_name").value_or("weight_update_group");
  if (r.group_name.empty()) throw bad_request("field 'group_name' must not be empty");
  r.backend = opt_string(o, "backend").value_or("nccl");
  if (r.backend != "nccl" && r.backend != "gloo") wrong("backend", "\"nccl\" (the default) or \"gloo\"");
  return r;
}

std::string parse_destroy_group_request(std::string_view body) {
  const json o = parse_object(body);
  only_known(o, {"group_name"});
  return opt_string(o, "group_name").value_or("weight_update_group");
}

msg::update_request parse_distributed_update_request(std::string_view body) {
  const json o = parse_object(body);
  msg::update_request r;
  r.source = msg::source_kind::distributed;
  r.group_name = opt_string(o, "group_name").value_or("weight_update_group");
  if (r.group_name.empty()) throw bad_request("field 'group_name' must not be empty");
  // The trainer broadcasts what it announced whatever refit answers; what refit refuses from here on
  // still goes to the workers, which drop the broadcast (or leave the group when its size is unknown).
  try {
    const auto names = required_strings(o, "names");
    const auto dtypes = required_strings(o, "dtypes");
    const auto shapes = required_shapes(o);
    if (dtypes.size() != names.size() || shapes.size() != names.size())
      throw bad_request("names, dtypes and shapes must be equally long (got " + std::to_string(names.size()) + ", " +
                        std::to_string(dtypes.size()) + ", " + std::to_string(shapes.size()) + ")");
    if (names.empty()) throw bad_request("field 'names' must list at least one tensor");
    r.flattened_bucket = opt_string(o, "load_format") == std::optional<std::string>("flattened_bucket");
    for (size_t i = 0; i < names.size(); ++i) r.tensors.push_back({names[i], dtypes[i], shapes[i]});
    for (size_t i = 0; i < names.size(); ++i) {
      if (names[i].empty()) throw bad_request("names[" + std::to_string(i) + "] is empty");
      if (!weights::parse_torch_dtype(dtypes[i]))
        throw bad_request("dtypes[" + std::to_string(i) + "] ('" + names[i] + "'): unknown dtype '" + dtypes[i] +
                          "' (torch's names: bfloat16, float16, float32, ...)");
    }
    only_known(o, {"names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version", "load_format",
                   "target_modules", "selector", "torch_empty_cache", "mode", "weight_update_mode", "lora_alpha", "lora_rank",
                   "check_finite"});
    r.flush_cache = opt_bool(o, "flush_cache").value_or(true);
    r.abort_all_requests = opt_bool(o, "abort_all_requests").value_or(false);
    r.weight_version = opt_weight_version(o);
    r.check_finite = opt_check_finite(o);
    if (auto f = opt_string(o, "load_format"); f && *f != "flattened_bucket")
      wrong("load_format", "null (one broadcast per tensor) or \"flattened_bucket\"");
    if (auto t = opt_strings(o, "target_modules")) {
      if (t->empty()) throw bad_request("field 'target_modules' must not be an empty list (null selects the denoising network)");
      r.target_modules = std::move(*t);
    }
    // A diffusion pipeline has no draft model: "all" and "target" are the same runners.
    if (auto sel = opt_string(o, "selector"); sel && *sel != "all" && *sel != "target")
      wrong("selector", "\"all\" or \"target\" (this server has no draft model)");
    r.empty_cache = opt_bool(o, "torch_empty_cache").value_or(false);
    const auto mode = msg::parse_update_mode(opt_string(o, "mode").value_or("auto"));
    if (!mode) wrong("mode", "one of \"auto\", \"staged\", \"in_place\"");
    r.mode = *mode;
    // weight_update_mode "lora_merge": the tensors are LoRA A/B weights to merge into the base (SGLang's).
    parse_lora_merge(o, r);
  } catch (const bad_request& e) {
    r.refused = e.what();
  }
  return r;
}

std::string group_result_json(const msg::group_result& r) { return text(json{{"success", r.success}, {"message", r.message}}); }

}  // namespace refit::net
