// module_updater::checksum: the module checksums over the values the module holds; tensor_sha256: SGLang's
// per-tensor hashes (update_weights_from_tensor_checker).
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <map>

#include "pipeline/models/layer_offload.hpp"
#include "pipeline/models/model_loader.hpp"
#include "pipeline/update/module_updater.hpp"
#include "pipeline/weights/parallel.hpp"

namespace refit::update {

namespace {

std::span<const std::byte> bytes_of(const at::Tensor& t) { return {static_cast<const std::byte*>(t.data_ptr()), t.nbytes()}; }

// SGLang's: one stream over the parameters in name order, each copied to the host in turn.
std::string sglang_format(const models::tensor_registry& registry, const std::vector<at::Tensor>& values) {
  const auto& slots = registry.slots();
  std::vector<size_t> order;
  for (size_t i = 0; i < slots.size(); ++i)
    if (!slots[i].is_buffer) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return slots[a].name < slots[b].name; });
  weights::sglang_checksum h;
  for (size_t i : order) h.add(slots[i].name, bytes_of(values[i].to(at::kCPU).contiguous()));
  return h.finish();
}

// refit's: a digest per tensor (spread over threads), combined with names, dtypes and shapes.
std::string refit_format(const models::tensor_registry& registry, const std::vector<at::Tensor>& values) {
  const auto& slots = registry.slots();
  std::vector<weights::tensor_digest_record> records(slots.size());
  weights::parallel_for_each(slots.size(), 0, [&](size_t i) {
    const at::Tensor t = values[i].to(at::kCPU).contiguous();
    weights::sha256 h;
    h.update(bytes_of(t));
    records[i] = {slots[i].name, weights::from_scalar_type(t.scalar_type()), t.sizes().vec(), h.finish()};
  });
  return weights::combine_module_checksum(std::move(records));
}

// torch's str(dtype): "torch.float32", ...
std::string torch_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Bool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// Python's repr(tuple(shape)): "()", "(3,)", "(3, 4)".
std::string tuple_repr(at::IntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

}  // namespace

std::map<std::string, std::string> module_updater::tensor_sha256(const std::vector<std::string>& names) const {
  c10::InferenceMode inference;
  const std::vector<at::Tensor> values = models::held_tensors(registry(), offload());
  std::map<std::string, std::string> out;
  for (const auto& name : names) {
    const models::tensor_slot* slot = registry().find(name);
    if (!slot) continue;
    const at::Tensor t = values.at(static_cast<size_t>(slot - registry().slots().data())).to(at::kCPU).contiguous();
    weights::sha256 h;
    h.update(torch_dtype(t.scalar_type()));
    h.update(tuple_repr(t.sizes()));
    h.update(bytes_of(t));
    const auto d = h.finish();
    out[name] = weights::to_hex(d);
  }
  return out;
}

std::string module_updater::checksum(weights::checksum_format format) const {
  c10::InferenceMode inference;
  const std::vector<at::Tensor> values = models::held_tensors(registry(), offload());
  return format == weights::checksum_format::sglang ? sglang_format(registry(), values) : refit_format(registry(), values);
}

}  // namespace refit::update
