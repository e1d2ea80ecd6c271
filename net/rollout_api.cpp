#include "net/rollout_api.hpp"

#include <msgpack.hpp>

#include <sstream>

#include "net/json_fields.hpp"

namespace refit::net {

using namespace fields;

namespace {

std::optional<std::vector<int64_t>> opt_indices(const json& o, const char* name) {
  const json* v = field(o, name);
  if (!v) return std::nullopt;
  if (!v->is_array()) wrong(name, "a list of step indices (integers from 0) or null");
  std::vector<int64_t> out;
  for (const auto& e : *v) {
    if (!e.is_number_integer() || (!e.is_number_unsigned() && e.get<int64_t>() < 0)) wrong(name, "a list of step indices (integers from 0) or null");
    out.push_back(e.get<int64_t>());
  }
  return out;
}

void refuse_if_set(const json& o, const char* name, const char* why) {
  const json* v = field(o, name);
  if (!v) return;
  if (v->is_boolean() && !v->get<bool>()) return;
  if ((v->is_array() || v->is_object()) && v->empty()) return;
  throw bad_request("field '" + std::string(name) + "' is not supported: " + why);
}

}  // namespace

rollout_http_request parse_rollout_request(std::string_view body) {
  const json o = parse_object(body);
  only_known(o, {"prompt", "negative_prompt", "seed", "generator_device", "width", "height", "num_inference_steps", "num_outputs_per_prompt",
                 "guidance_scale", "true_cfg_scale", "num_frames", "fps", "rollout", "rollout_sde_type", "rollout_noise_level",
                 "rollout_log_prob_no_const", "rollout_debug_mode", "rollout_return_denoising_env", "rollout_return_dit_trajectory",
                 "rollout_sde_step_indices", "rollout_return_step_indices", "image_path", "suppress_logs", "extra_sampling_params"});
  rollout_http_request out;
  auto& r = out.rollout;
  auto& g = r.generation;
  auto prompt = opt_text(o, "prompt");
  if (!prompt || prompt->empty()) throw bad_request("prompt is required");
  g.prompts = {std::move(*prompt)};
  g.negative_prompt = opt_text(o, "negative_prompt").value_or("");
  if (auto seed = opt_uint64(o, "seed")) {
    g.seed = *seed;
    out.seed_given = true;
  }
  if (auto d = opt_string(o, "generator_device"); d && *d != "cpu")
    throw bad_request("field 'generator_device' = \"" + *d + "\" is not supported: refit draws every sample's noise from a CPU generator seeded "
                      "seed + i (send \"cpu\" or leave it out)");
  g.width = opt_int(o, "width", 1, 8192, "a positive integer up to 8192").value_or(0);
  g.height = opt_int(o, "height", 1, 8192, "a positive integer up to 8192").value_or(0);
  if (g.width && g.height && g.width * g.height > 2048 * 2048)
    throw bad_request("fields 'width'/'height' must be at most 4194304 pixels per image, got " + std::to_string(g.width) + "x" + std::to_string(g.height));
  g.steps = opt_int(o, "num_inference_steps", 1, 1000, "an integer between 1 and 1000").value_or(0);
  // Flow-GRPO groups are 16-24 samples per prompt; one request runs them as one batch, so the batch's pixels are bounded.
  g.images_per_prompt = opt_int(o, "num_outputs_per_prompt", 1, 64, "an integer between 1 and 64").value_or(1);
  if (g.width && g.height && int64_t{g.images_per_prompt} * g.width * g.height > int64_t{64} * 512 * 512)
    throw bad_request("fields 'num_outputs_per_prompt' x 'width' x 'height' must be at most 16777216 pixels per request (a batch of 64 at "
                      "512x512, 16 at 1024x1024), got " + std::to_string(g.images_per_prompt) + " x " + std::to_string(g.width) + "x" +
                      std::to_string(g.height) + "; send several requests");
  // The pipelines refit serves take one guidance scale; SGLang's gives true_cfg_scale, when set, precedence.
  auto positive = [&](const char* name) -> std::optional<double> {
    auto v = opt_number(o, name);
    if (v && *v < 0) wrong(name, "a non-negative number");
    return v;
  };
  const auto guidance = positive("guidance_scale"), true_cfg = positive("true_cfg_scale");
  if (true_cfg) g.guidance_scale = *true_cfg;
  else if (guidance) g.guidance_scale = *guidance;
  refuse_if_set(o, "num_frames", "refit serves image pipelines");
  refuse_if_set(o, "fps", "refit serves image pipelines");
  refuse_if_set(o, "image_path", "image-conditioned rollouts (editing) are not served yet");
  refuse_if_set(o, "extra_sampling_params", "every sampling parameter refit takes is a field of its own");
  opt_bool(o, "suppress_logs");  // type-checked; refit's logs are per request either way
  r.rollout = opt_bool(o, "rollout").value_or(true);
  if (auto t = opt_string(o, "rollout_sde_type")) {
    if (*t == "sde") r.sde_type = msg::rollout_sde::sde;
    else if (*t == "cps") r.sde_type = msg::rollout_sde::cps;
    else if (*t == "ode") r.sde_type = msg::rollout_sde::ode;
    else throw bad_request("rollout_sde_type must be one of ('sde', 'cps', 'ode'), got '" + *t + "'");
  }
  if (auto n = opt_number(o, "rollout_noise_level")) {
    if (*n < 0) throw bad_request("rollout_noise_level must be non-negative, got " + std::to_string(*n));
    r.noise_level = *n;
  }
  r.log_prob_no_const = opt_bool(o, "rollout_log_prob_no_const").value_or(false);
  r.debug = opt_bool(o, "rollout_debug_mode").value_or(true);  // SGLang's endpoint default
  r.return_denoising_env = opt_bool(o, "rollout_return_denoising_env").value_or(false);
  r.return_dit_trajectory = opt_bool(o, "rollout_return_dit_trajectory").value_or(false);
  if (auto s = opt_indices(o, "rollout_sde_step_indices")) {
    r.sde_steps_given = true;
    r.sde_step_indices = std::move(*s);
  }
  if (auto s = opt_indices(o, "rollout_return_step_indices")) {
    r.return_steps_given = true;
    r.return_step_indices = std::move(*s);
  }
  if (r.rollout && !r.log_prob_no_const && r.sde_type != msg::rollout_sde::ode && !(r.noise_level > 0))
    throw bad_request("True log-probability computation requires a non-zero noise level.");
  if (r.rollout && !r.log_prob_no_const && r.sde_type == msg::rollout_sde::ode)
    throw bad_request("p_ode is always 0, true log_prob is meaningless, set rollout_log_prob_no_const to True to enable log_prob computation");
  return out;
}

namespace {

using packer = msgpack::packer<std::stringstream>;

void pack_str(packer& pk, std::string_view s) {
  pk.pack_str(static_cast<uint32_t>(s.size()));
  pk.pack_str_body(s.data(), static_cast<uint32_t>(s.size()));
}

void pack_tensor(packer& pk, const msg::encoded_tensor& t) {
  pk.pack_map(4);
  pack_str(pk, "__tensor__");
  pk.pack_true();
  pack_str(pk, "data");
  pk.pack_bin(static_cast<uint32_t>(t.safetensors.size()));
  pk.pack_bin_body(reinterpret_cast<const char*>(t.safetensors.data()), static_cast<uint32_t>(t.safetensors.size()));
  pack_str(pk, "shape");
  pk.pack_array(static_cast<uint32_t>(t.shape.size()));
  for (int64_t d : t.shape) pk.pack_int64(d);
  pack_str(pk, "dtype");
  pack_str(pk, t.dtype);
}

void pack_env_group(packer& pk, const std::map<std::string, std::vector<msg::encoded_tensor>>& kwargs) {
  pk.pack_map(static_cast<uint32_t>(kwargs.size()));
  for (const auto& [name, tensors] : kwargs) {
    pack_str(pk, name);
    if (tensors.size() == 1) {
      pack_tensor(pk, tensors.front());
    } else {  // a tuple (e.g. freqs_cis = (cos, sin))
      pk.pack_array(static_cast<uint32_t>(tensors.size()));
      for (const auto& t : tensors) pack_tensor(pk, t);
    }
  }
}

void pack_sample(packer& pk, const msg::rollout_result& r, const msg::rollout_sample_result& s) {
  pk.pack_map(11);
  pack_str(pk, "request_id");
  pack_str(pk, r.request_id);
  pack_str(pk, "prompt");
  pack_str(pk, r.prompt);
  pack_str(pk, "seed");
  pk.pack_uint64(r.seed);
  pack_str(pk, "generated_output");
  pack_tensor(pk, s.generated_output);
  pack_str(pk, "rollout_log_probs");
  if (s.log_probs.empty()) pk.pack_nil();
  else pack_tensor(pk, s.log_probs.front());
  pack_str(pk, "rollout_debug_tensors");
  if (s.debug_tensors.empty()) {
    pk.pack_nil();
  } else {
    pk.pack_map(static_cast<uint32_t>(s.debug_tensors.size()));
    for (const auto& [name, t] : s.debug_tensors) {
      pack_str(pk, name);
      pack_tensor(pk, t);
    }
  }
  pack_str(pk, "denoising_env");
  if (s.denoising_env.empty()) {
    pk.pack_nil();
  } else {
    pk.pack_map(4);
    for (const char* group : {"image_kwargs", "pos_cond_kwargs", "neg_cond_kwargs"}) {
      pack_str(pk, group);
      auto it = s.denoising_env.find(group);
      if (it == s.denoising_env.end() || it->second.empty()) pk.pack_nil();
      else pack_env_group(pk, it->second);
    }
    pack_str(pk, "guidance");
    pk.pack_nil();  // the pipelines refit serves embed no guidance scale
  }
  pack_str(pk, "dit_trajectory");
  if (s.dit_trajectory.empty()) {
    pk.pack_nil();
  } else {
    pk.pack_map(static_cast<uint32_t>(s.dit_trajectory.size()));
    for (const auto& [name, t] : s.dit_trajectory) {
      pack_str(pk, name);
      pack_tensor(pk, t);
    }
  }
  pack_str(pk, "inference_time_s");
  if (r.inference_time_s > 0) pk.pack_double(r.inference_time_s);
  else pk.pack_nil();
  pack_str(pk, "peak_memory_mb");
  if (r.peak_memory_mb > 0) pk.pack_double(r.peak_memory_mb);
  else pk.pack_nil();
  pack_str(pk, "weight_version");
  pack_str(pk, r.weight_version);
}

}  // namespace

std::string rollout_response_msgpack(const msg::rollout_result& r) {
  std::stringstream out;
  packer pk(out);
  pk.pack_array(static_cast<uint32_t>(r.samples.size()));
  for (const auto& s : r.samples) pack_sample(pk, r, s);
  return out.str();
}

}  // namespace refit::net
