// module_updater::checksum: the module checksums over the values the module holds.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>

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

}  // namespace

std::string module_updater::checksum(weights::checksum_format format) const {
  c10::InferenceMode inference;
  const std::vector<at::Tensor> values = models::held_tensors(registry(), offload());
  return format == weights::checksum_format::sglang ? sglang_format(registry(), values) : refit_format(registry(), values);
}

}  // namespace refit::update
