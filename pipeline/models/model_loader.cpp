#include "pipeline/models/model_loader.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <set>

#include "pipeline/models/layer_offload.hpp"
#include "pipeline/weights/device_loader.hpp"
#include "pipeline/weights/host_loader.hpp"

namespace refit::models {

using weights::weight_errc;
using weights::weight_error;

namespace {
std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

bool is_float_type(c10::ScalarType t) { return at::isFloatingType(t); }
}  // namespace

void validate_against(const tensor_registry& registry, const weights::module_weights& w) {
  const std::string where = "module '" + w.module + "' (" + w.dir.string() + ")";
  for (const auto& slot : registry.slots()) {
    auto it = w.tensors.find(slot.name);
    if (it == w.tensors.end())
      throw weight_error(weight_errc::shard_mismatch, where + ": checkpoint lacks tensor '" + slot.name + "' (expected shape " + shape_str(slot.shape) + ")");
    const auto& entry = *it->second.entry;
    if (entry.shape != slot.shape)
      throw weight_error(weight_errc::bad_shape, where + ": tensor '" + slot.name + "' has shape " + shape_str(entry.shape) +
                                                     ", the model expects " + shape_str(slot.shape));
    const bool stored_float = weights::is_convertible_float(entry.type);
    if (slot.fixed_dtype) {
      if (weights::to_scalar_type(entry.type) != *slot.fixed_dtype)
        throw weight_error(weight_errc::unconvertible_dtype, where + ": tensor '" + slot.name + "' is " +
                                                                 std::string(weights::dtype_name(entry.type)) + ", the model holds it as " +
                                                                 c10::toString(*slot.fixed_dtype));
    } else if (!stored_float) {
      throw weight_error(weight_errc::unconvertible_dtype, where + ": tensor '" + slot.name + "' is " +
                                                               std::string(weights::dtype_name(entry.type)) +
                                                               ", which cannot be converted to a floating parameter");
    }
  }
  for (const auto& [name, loc] : w.tensors)
    if (!registry.find(name))
      throw weight_error(weight_errc::shard_mismatch, where + ": checkpoint tensor '" + name + "' (in " +
                                                          w.shards[loc.shard].path().filename().string() + ") is not part of the model");
}

std::vector<at::Tensor> held_tensors(const tensor_registry& registry, const layer_offload* offload) {
  const auto& slots = registry.slots();
  std::vector<at::Tensor> out;
  out.reserve(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) out.push_back(offload && offload->offloaded(i) ? offload->host_tensor(i) : *slots[i].tensor);
  return out;
}

c10::ScalarType held_dtype(const tensor_slot& slot, const placement& where) { return slot.fixed_dtype.value_or(where.float_dtype); }

void read_checkpoint(const weights::module_weights& w, const weights::named_tensors& dst, const placement& where,
                     weights::device_loader* loader, const std::vector<std::vector<at::Tensor>>* replicas) {
  const weights::host_load_options opts = load_options(where);
  if (replicas) {
    if (!loader || replicas->size() != dst.size()) throw std::invalid_argument("replicas need the GPU loader and one list per destination");
    loader->read_into(w, dst, opts, replicas);
    return;
  }
  weights::named_tensors host, device;
  for (const auto& entry : dst) (entry.second.device().is_cpu() ? host : device).push_back(entry);
  if (!host.empty()) weights::read_into(w, host, opts);
  if (device.empty()) return;
  if (loader) {
    loader->read_into(w, device, opts);
    return;
  }
  // No fast path (a CUDA device without a loader): read into host memory, then copy.
  weights::named_tensors staging;
  for (const auto& [name, t] : device) staging.emplace_back(name, at::empty(t.sizes(), t.options().device(at::kCPU)));
  weights::read_into(w, staging, opts);
  for (size_t i = 0; i < device.size(); ++i) device[i].second.copy_(staging[i].second);
}

void load_into(tensor_registry& registry, const weights::module_weights& w, const placement& where,
               weights::device_loader* loader, layer_offload* offload) {
  validate_against(registry, w);
  const auto& slots = registry.slots();
  weights::named_tensors dst;
  for (size_t i = 0; i < slots.size(); ++i) {
    const bool hosted = offload && offload->offloaded(i);
    dst.emplace_back(slots[i].name, hosted ? offload->host_tensor(i)
                                           : at::empty(slots[i].shape, at::TensorOptions().dtype(held_dtype(slots[i], where)).device(where.device)));
  }
  read_checkpoint(w, dst, where, loader);
  for (size_t i = 0; i < slots.size(); ++i)
    if (!(offload && offload->offloaded(i))) *slots[i].tensor = dst[i].second;
}

at::Tensor random_value(const tensor_slot& slot, uint64_t seed, c10::ScalarType float_dtype, double std) {
  if (slot.fixed_dtype && !is_float_type(*slot.fixed_dtype)) return at::zeros(slot.shape, at::TensorOptions().dtype(*slot.fixed_dtype));
  uint64_t h = 1469598103934665603ull ^ seed;  // FNV-1a over the name, keyed by the seed
  for (unsigned char ch : slot.name) h = (h ^ ch) * 1099511628211ull;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(h);
  at::Tensor t = at::randn(slot.shape, gen, at::TensorOptions().dtype(at::kFloat)) * std;
  const std::string& n = slot.name;
  auto ends_with = [&n](std::string_view s) { return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0; };
  if (ends_with("running_var")) t = t.abs() + 1.0;
  else if (ends_with(".weight") && slot.shape.size() == 1) t = t + 1.0;
  return t.to(slot.fixed_dtype.value_or(float_dtype));
}

void init_random(tensor_registry& registry, uint64_t seed, const placement& where, double std) {
  for (const auto& slot : registry.slots()) {
    at::Tensor t = random_value(slot, seed, where.float_dtype, std);
    *slot.tensor = where.device.is_cpu() ? t : t.to(where.device);
  }
}

}  // namespace refit::models
