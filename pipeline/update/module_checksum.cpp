// module_updater::checksum: refit's module checksum over the values the module holds.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include "pipeline/models/layer_offload.hpp"
#include "pipeline/models/model_loader.hpp"
#include "pipeline/update/module_updater.hpp"
#include "pipeline/weights/checksum.hpp"
#include "pipeline/weights/parallel.hpp"

namespace refit::update {

std::string module_updater::checksum() const {
  c10::InferenceMode inference;
  const auto& slots = registry().slots();
  const std::vector<at::Tensor> values = models::held_tensors(registry(), offload());
  std::vector<weights::tensor_digest_record> records(slots.size());
  weights::parallel_for_each(slots.size(), 0, [&](size_t i) {
    const at::Tensor t = values[i].to(at::kCPU).contiguous();
    weights::sha256 h;
    h.update({static_cast<const std::byte*>(t.data_ptr()), t.nbytes()});
    records[i] = {slots[i].name, weights::from_scalar_type(t.scalar_type()), t.sizes().vec(), h.finish()};
  });
  return weights::combine_module_checksum(std::move(records));
}

}  // namespace refit::update
