#include "pipeline/update/checkpoint_source.hpp"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <chrono>

#include "pipeline/models/model_loader.hpp"
#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::update {

checkpoint_source::checkpoint_source(std::filesystem::path module_dir, weights::file_scope scope)
    : dir_(std::move(module_dir)), scope_(std::move(scope)) {}
checkpoint_source::~checkpoint_source() = default;

source_plan checkpoint_source::plan(const module_context& m) {
  auto w = std::make_unique<weights::module_weights>(weights::open_module_dir(m.module, dir_, scope_));
  models::validate_against(m.registry, *w);
  source_plan p;
  p.slots.resize(m.registry.slots().size());
  for (size_t i = 0; i < p.slots.size(); ++i) p.slots[i] = i;
  p.bytes = w->total_bytes;
  opened_ = std::move(w);
  return p;
}

void checkpoint_source::fill(const module_context& m, const fill_target& target) {
  std::unique_ptr<weights::module_weights> w = std::move(opened_);
  if (!w) {
    w = std::make_unique<weights::module_weights>(weights::open_module_dir(m.module, dir_, scope_));
    models::validate_against(m.registry, *w);
  }
  const auto t0 = std::chrono::steady_clock::now();
  weights::named_tensors named;
  uint64_t bytes = 0;
  for (size_t k = 0; k < target.slots.size(); ++k) {
    named.emplace_back(m.registry.slots().at(target.slots[k]).name, target.destinations[k]);
    bytes += target.destinations[k].nbytes();
  }
  models::read_checkpoint(*w, named, m.where, m.loader);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  spdlog::info("module {} (worker {}): read {:.1f} MB from {} to {} in {:.3f} s ({:.2f} GB/s)", m.module, m.worker, bytes / 1e6,
               dir_.string(), m.where.device.str(), s, s > 0 ? bytes / s / 1e9 : 0.0);
}

}  // namespace refit::update
