#include "pipeline/lora/adapter.hpp"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <algorithm>
#include <set>
#include <stdexcept>

#include "pipeline/models/tensor_registry.hpp"
#include "pipeline/weights/host_loader.hpp"
#include "pipeline/weights/safetensors.hpp"

namespace refit::lora {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::invalid_argument bad(const std::string& what) { return std::invalid_argument(what); }

std::string shape_text(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The LoRA settings refit honours, from PEFT's adapter_config.json or Diffusers' metadata.
struct lora_config {
  std::optional<double> alpha;
  bool rslora = false;
  std::map<std::string, double> alpha_pattern;  // layer-name suffix -> alpha
  std::string origin;                           // for messages
};

void refuse_unsupported(const json& c, const std::string& origin) {
  auto truthy = [&](const char* key) { return c.contains(key) && !c[key].is_null() && c[key] != false && c[key] != json::array(); };
  if (truthy("use_dora")) throw bad(origin + ": DoRA adapters (use_dora) are not supported; refit merges plain LoRA");
  if (c.contains("bias") && c["bias"].is_string() && c["bias"] != "none")
    throw bad(origin + ": bias '" + c["bias"].get<std::string>() + "' is not supported (LoRA without bias terms only)");
  if (truthy("lora_bias")) throw bad(origin + ": lora_bias is not supported");
  if (truthy("fan_in_fan_out")) throw bad(origin + ": fan_in_fan_out is not supported");
  if (truthy("modules_to_save")) throw bad(origin + ": modules_to_save is not supported (the adapter would replace whole modules)");
  if (truthy("layer_replication")) throw bad(origin + ": layer_replication is not supported");
}

lora_config parse_config(const json& c, const std::string& origin) {
  if (!c.is_object()) throw bad(origin + ": the LoRA config is not a JSON object");
  refuse_unsupported(c, origin);
  lora_config out;
  out.origin = origin;
  if (c.contains("lora_alpha") && c["lora_alpha"].is_number()) out.alpha = c["lora_alpha"].get<double>();
  if (c.contains("use_rslora") && c["use_rslora"].is_boolean()) out.rslora = c["use_rslora"].get<bool>();
  if (c.contains("alpha_pattern") && c["alpha_pattern"].is_object())
    for (const auto& [k, v] : c["alpha_pattern"].items()) {
      if (!v.is_number()) throw bad(origin + ": alpha_pattern['" + k + "'] is not a number");
      if (k.find_first_of("^$*+?()[]{}|\\") != std::string::npos)
        throw bad(origin + ": alpha_pattern key '" + k + "' is a regular expression; refit matches layer-name suffixes only");
      out.alpha_pattern[k] = v.get<double>();
    }
  return out;
}

std::optional<lora_config> config_beside(const fs::path& dir, const weights::file_scope& scope) {
  const fs::path p = dir / "adapter_config.json";
  if (!scope.stat(p)) return std::nullopt;
  json c = json::parse(scope.read_small_file(p), nullptr, /*allow_exceptions=*/false);
  // Not the parser's message: it quotes the bytes it last read.
  if (c.is_discarded()) throw bad(p.string() + ": not valid JSON");
  return parse_config(c, p.string());
}

std::optional<lora_config> config_in_metadata(const weights::safetensors_file& f, const std::string& module) {
  const auto& md = f.header().metadata;
  auto it = md.find("lora_adapter_metadata");
  if (it == md.end()) return std::nullopt;
  json c;
  try {
    c = json::parse(it->second);
  } catch (const std::exception& e) {
    throw bad(f.path().string() + ": metadata 'lora_adapter_metadata' is not valid JSON: " + e.what());
  }
  if (!c.is_object()) throw bad(f.path().string() + ": metadata 'lora_adapter_metadata' is not a JSON object");
  // Diffusers prefixes each key with the module ("transformer.r"); keep this module's keys.
  json own = json::object();
  const std::string prefix = module + ".";
  bool prefixed = false;
  for (const auto& [k, v] : c.items())
    if (k.rfind(prefix, 0) == 0) {
      own[k.substr(prefix.size())] = v;
      prefixed = true;
    }
  return parse_config(prefixed ? own : c, f.path().string() + " (lora_adapter_metadata)");
}

fs::path weights_file(const fs::path& path, const weights::file_scope& scope) {
  if (scope.is_regular_file(path)) {
    if (path.extension() != ".safetensors") throw bad(path.string() + ": not a .safetensors file");
    return path;
  }
  if (!scope.is_directory(path)) throw bad(path.string() + ": no such adapter file or folder");
  for (const char* name : {"adapter_model.safetensors", "pytorch_lora_weights.safetensors"})
    if (scope.stat(path / name)) return path / name;
  std::vector<fs::path> found;
  for (const auto& name : scope.list(path))
    if (fs::path(name).extension() == ".safetensors") found.push_back(path / name);
  std::sort(found.begin(), found.end());
  if (found.size() == 1) return found.front();
  throw bad(path.string() + ": " + (found.empty() ? "no .safetensors file" : "several .safetensors files and none named "
                                                                               "adapter_model.safetensors or pytorch_lora_weights.safetensors"));
}

std::map<std::string, at::Tensor> strip_prefixes(const std::map<std::string, at::Tensor>& in, const std::string& module) {
  std::vector<std::string> names;
  for (const auto& [k, v] : in) names.push_back(k);
  const size_t n = shared_prefix(names, module).size();
  std::map<std::string, at::Tensor> out;
  for (const auto& [k, v] : in) out[k.substr(n)] = v;
  return out;
}

double layer_alpha(const lora_config* config, const std::string& layer, std::optional<double> override, int64_t rank) {
  if (config)
    for (const auto& [suffix, a] : config->alpha_pattern)
      if (layer == suffix || ends_with(layer, "." + suffix)) return a;
  if (override) return *override;
  if (config && config->alpha) return *config->alpha;
  return static_cast<double>(rank);
}

std::shared_ptr<adapter> build(const std::string& nickname, const std::string& path, const std::string& module,
                               const std::map<std::string, at::Tensor>& tensors, const lora_config* config,
                               std::optional<double> alpha, const std::string& origin) {
  struct pair {
    at::Tensor a, b, alpha;
  };
  std::map<std::string, pair> layers;  // by layer name (the weight without ".weight")
  for (const auto& [name, t] : tensors) {
    if (ends_with(name, ".alpha")) {
      if (t.numel() != 1) throw bad(origin + ": tensor '" + name + "' (a network alpha) must hold one value, has shape " + shape_text(t.sizes()));
      layers[name.substr(0, name.size() - 6)].alpha = t;
      continue;
    }
    const auto [weight, is_a] = lora_target(name);
    auto& p = layers[weight.substr(0, weight.size() - 7)];
    (is_a ? p.a : p.b) = t;
  }
  auto out = std::make_shared<adapter>();
  out->nickname = nickname;
  out->path = path;
  out->module = module;
  for (auto& [layer, p] : layers) {
    if (!p.a.defined() || !p.b.defined())
      throw bad(origin + ": layer '" + layer + "' has " + (p.a.defined() ? "lora_A but no lora_B" : p.b.defined() ? "lora_B but no lora_A" : "an alpha but no lora_A/lora_B") + " weight");
    if (p.a.dim() != 2 || p.b.dim() != 2)
      throw bad(origin + ": layer '" + layer + "': lora_A " + shape_text(p.a.sizes()) + " and lora_B " + shape_text(p.b.sizes()) +
                " must both be 2-D (convolution adapters are not supported)");
    if (p.a.size(0) != p.b.size(1))
      throw bad(origin + ": layer '" + layer + "': rank mismatch, lora_A " + shape_text(p.a.sizes()) + " has rank " + std::to_string(p.a.size(0)) +
                " but lora_B " + shape_text(p.b.sizes()) + " has rank " + std::to_string(p.b.size(1)));
    if (p.a.size(0) == 0) throw bad(origin + ": layer '" + layer + "' has rank 0");
    lora_layer l;
    l.weight = layer + ".weight";
    l.a = p.a.to(at::kFloat).contiguous();
    l.b = p.b.to(at::kFloat).contiguous();
    const double a = p.alpha.defined() ? p.alpha.to(at::kDouble).item<double>() : layer_alpha(config, layer, alpha, l.rank());
    const bool rs = config && config->rslora;
    l.scaling = rs ? a / std::sqrt(static_cast<double>(l.rank())) : a / static_cast<double>(l.rank());
    out->layers.push_back(std::move(l));
  }
  if (out->layers.empty()) throw bad(origin + ": no LoRA A/B tensor pairs found");
  return out;
}

}  // namespace

std::string shared_prefix(const std::vector<std::string>& names, const std::string& module) {
  std::string prefix;
  for (const std::string& step : {std::string("base_model.model."), module + ".", std::string("diffusion_model.")}) {
    bool all = !names.empty();
    for (const auto& k : names) all &= k.size() > prefix.size() + step.size() && k.compare(0, prefix.size() + step.size(), prefix + step) == 0;
    if (all) prefix += step;
  }
  return prefix;
}

uint64_t adapter::bytes() const {
  uint64_t n = 0;
  for (const auto& l : layers) n += l.a.nbytes() + l.b.nbytes();
  return n;
}

std::pair<std::string, bool> lora_target(const std::string& name) {
  for (const bool a : {true, false}) {
    const std::string tag = a ? ".lora_A." : ".lora_B.";
    const auto at = name.find(tag);
    if (at == std::string::npos) continue;
    const std::string rest = name.substr(at + tag.size());
    // PEFT may keep the adapter's slot name: "x.lora_A.default.weight".
    if (rest == "weight" || (ends_with(rest, ".weight") && rest.find('.') == rest.size() - 7)) return {name.substr(0, at) + ".weight", a};
    if (ends_with(rest, "bias")) throw bad("tensor '" + name + "' is a LoRA bias; adapters with bias terms are not supported");
  }
  if (name.find(".lora_down.") != std::string::npos || name.find(".lora_up.") != std::string::npos)
    throw bad("tensor '" + name + "' uses kohya's lora_down/lora_up names; refit reads PEFT and Diffusers LoRA formats (lora_A/lora_B)");
  if (name.find("lora_magnitude_vector") != std::string::npos) throw bad("tensor '" + name + "' belongs to a DoRA adapter, which is not supported");
  throw bad("tensor '" + name + "' is not a LoRA weight (expected '<layer>.lora_A.weight' or '<layer>.lora_B.weight')");
}

std::shared_ptr<const adapter> read_adapter(const std::string& nickname, const fs::path& path, const std::string& module,
                                            std::optional<double> alpha, const weights::file_scope& scope) {
  const fs::path file = weights_file(path, scope);
  auto f = weights::safetensors_file::open(file, scope);
  std::optional<lora_config> config = config_beside(file.parent_path(), scope);
  if (!config) config = config_in_metadata(f, module);
  std::map<std::string, at::Tensor> tensors;
  for (const auto& e : f.header().tensors) {
    const auto bytes = f.bytes(e);
    const auto type = weights::to_scalar_type(e.type);
    if (!c10::isFloatingType(type)) throw bad(file.string() + ": tensor '" + e.name + "' is not floating point");
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(type));
    if (t.nbytes() != bytes.size()) throw bad(file.string() + ": tensor '" + e.name + "' has an inconsistent byte length");
    std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
    tensors[e.name] = std::move(t);
  }
  f.check_unchanged();
  return build(nickname, path.string(), module, strip_prefixes(tensors, module), config ? &*config : nullptr, alpha,
               file.string());
}

std::shared_ptr<const adapter> adapter_from_tensors(const std::string& nickname, const std::string& module,
                                                    const std::map<std::string, at::Tensor>& tensors, std::optional<double> alpha) {
  std::map<std::string, at::Tensor> host;
  for (const auto& [k, v] : tensors) host[k] = v.to(at::kCPU);
  return build(nickname, "", module, strip_prefixes(host, module), nullptr, alpha,
               "the trainer's tensors");
}

void check_announced(const models::tensor_registry& registry, const std::string& module, const std::string& name,
                     const std::vector<int64_t>& shape) {
  const auto [weight, is_a] = lora_target(name);
  const models::tensor_slot* slot = registry.find(weight);
  if (!slot) throw bad("tensor '" + name + "': module '" + module + "' has no weight '" + weight + "'");
  if (slot->shape.size() != 2) throw bad("tensor '" + name + "': the weight '" + weight + "' it targets is not 2-D");
  if (shape.size() != 2 || (is_a ? shape[1] != slot->shape[1] : shape[0] != slot->shape[0]))
    throw bad("tensor '" + name + "': shape " + shape_text(shape) + " does not fit the weight '" + weight + "' " + shape_text(slot->shape) +
              (is_a ? " (lora_A is [r, in])" : " (lora_B is [out, r])"));
}

void check_fits(const adapter& a, const models::tensor_registry& registry) {
  for (const auto& l : a.layers) {
    const std::string layer = l.weight.substr(0, l.weight.size() - 7);
    const models::tensor_slot* slot = registry.find(l.weight);
    if (!slot || slot->is_buffer)
      throw bad("adapter '" + a.nickname + "': tensor '" + layer + ".lora_A.weight' targets '" + l.weight + "', which module '" + a.module +
                "' does not have");
    if (slot->shape.size() != 2 || slot->fixed_dtype)
      throw bad("adapter '" + a.nickname + "': '" + l.weight + "' of module '" + a.module + "' is not a 2-D floating weight");
    if (l.b.size(0) != slot->shape[0] || l.a.size(1) != slot->shape[1])
      throw bad("adapter '" + a.nickname + "': layer '" + layer + "': lora_B " + shape_text(l.b.sizes()) + " @ lora_A " + shape_text(l.a.sizes()) +
                " does not give the shape of '" + l.weight + "' " + shape_text(slot->shape));
  }
}

std::shared_ptr<const adapter> adapter_store::load(const std::string& nickname, const std::string& path, const std::string& module,
                                                   std::optional<double> alpha, uint64_t update, const weights::file_scope& scope) {
  std::lock_guard lock(mutex_);
  auto& mine = pending_[update];
  for (const auto& e : mine)
    if (e.nickname == nickname && e.a->path == path && e.alpha == alpha && e.a->module == module) return e.a;
  auto a = read_adapter(nickname, path, module, alpha, scope);
  std::erase_if(mine, [&](const entry& e) { return e.nickname == nickname; });
  mine.push_back({nickname, a, alpha});
  return a;
}

void adapter_store::put(std::shared_ptr<const adapter> a, uint64_t update) {
  std::lock_guard lock(mutex_);
  auto& mine = pending_[update];
  std::erase_if(mine, [&](const entry& e) { return e.nickname == a->nickname; });
  const std::string name = a->nickname;
  mine.push_back({name, std::move(a), std::nullopt});
}

std::shared_ptr<const adapter> adapter_store::pending(const std::string& nickname, uint64_t update) const {
  std::lock_guard lock(mutex_);
  auto it = pending_.find(update);
  if (it != pending_.end())
    for (const auto& e : it->second)
      if (e.nickname == nickname) return e.a;
  return nullptr;
}

std::shared_ptr<const adapter> adapter_store::find(const std::string& nickname) const {
  std::lock_guard lock(mutex_);
  for (const auto& e : kept_)
    if (e.nickname == nickname) return e.a;
  return nullptr;
}

void adapter_store::end_update(uint64_t update, bool committed) {
  std::lock_guard lock(mutex_);
  auto it = pending_.find(update);
  if (it == pending_.end()) return;
  if (committed)
    for (auto& e : it->second) {
      auto same = std::find_if(kept_.begin(), kept_.end(), [&](const entry& k) { return k.nickname == e.nickname; });
      if (same != kept_.end()) *same = std::move(e);
      else kept_.push_back(std::move(e));
    }
  pending_.erase(it);
}

std::vector<std::pair<std::string, std::string>> adapter_store::list() const {
  std::lock_guard lock(mutex_);
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& e : kept_) out.emplace_back(e.nickname, e.a->path);
  return out;
}

}  // namespace refit::lora
