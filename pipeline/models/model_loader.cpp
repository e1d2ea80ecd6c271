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

void load_into(tensor_registry& registry, const weights::module_weights& w, const placement& where,
               weights::device_loader* loader, layer_offload* offload) {
  validate_against(registry, w);
  weights::host_load_options opts;
  // The loader converts convertible floats; fixed-dtype slots are integer or bool and keep theirs.
  switch (where.float_dtype) {
    case at::kFloat: opts.float_dtype = weights::dtype::F32; break;
    case at::kBFloat16: opts.float_dtype = weights::dtype::BF16; break;
    case at::kHalf: opts.float_dtype = weights::dtype::F16; break;
    default: throw std::invalid_argument("unsupported model dtype " + std::string(c10::toString(where.float_dtype)));
  }
  auto held_type = [&](const tensor_slot& slot) {
    const auto stored = w.tensors.at(slot.name).entry->type;
    return slot.fixed_dtype.value_or(weights::is_convertible_float(stored) ? where.float_dtype : weights::to_scalar_type(stored));
  };
  if (offload) {
    // Offloaded slots go straight into the host store; the others are read into host tensors and
    // moved (or, on a GPU with the fast path, read straight into device tensors).
    const auto& slots = registry.slots();
    weights::named_tensors host_dst, device_dst, resident;
    for (size_t i = 0; i < slots.size(); ++i) {
      if (offload->offloaded(i)) {
        host_dst.emplace_back(slots[i].name, offload->host_tensor(i));
      } else {
        const bool direct = loader && where.device.is_cuda();
        at::Tensor t = at::empty(slots[i].shape, at::TensorOptions().dtype(held_type(slots[i])).device(direct ? where.device : at::kCPU));
        (direct ? device_dst : resident).emplace_back(slots[i].name, t);
      }
    }
    weights::read_into(w, host_dst, opts);
    weights::read_into(w, resident, opts);
    if (!device_dst.empty()) loader->read_into(w, device_dst, opts);
    for (auto* list : {&resident, &device_dst})
      for (auto& [name, t] : *list) *registry.find(name)->tensor = t.to(where.device);  // no copy when already there
    return;
  }
  if (loader && where.device.is_cuda()) {
    weights::named_tensors dst;
    for (const auto& slot : registry.slots()) {
      *slot.tensor = at::empty(slot.shape, at::TensorOptions().dtype(held_type(slot)).device(where.device));
      dst.emplace_back(slot.name, *slot.tensor);
    }
    loader->read_into(w, dst, opts);
    return;
  }
  for (auto& [name, host] : weights::load_to_host(w, opts)) {
    const tensor_slot* slot = registry.find(name);
    *slot->tensor = where.device.is_cpu() ? host : host.to(where.device);
  }
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
