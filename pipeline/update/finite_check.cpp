#include "pipeline/update/finite_check.hpp"

#include <ATen/ATen.h>

#include <map>
#include <utility>

namespace refit::update {

namespace {

bool checked(const at::Tensor& t) { return t.defined() && t.numel() > 0 && at::isFloatingType(t.scalar_type()); }

// t's minimum and maximum, on its device: NaN when t holds a NaN, an infinity when it holds one. aminmax
// reads the tensor once; float types it does not reduce (fp8) are widened first.
std::pair<at::Tensor, at::Tensor> extremes(const at::Tensor& t) {
  const auto type = t.scalar_type();
  const bool common = type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
  auto [lo, hi] = at::aminmax(common ? t : t.to(at::kFloat));
  return {lo, hi};
}

bool finite(const at::Tensor& t) {
  auto [lo, hi] = extremes(t);
  return at::isfinite(lo).item<bool>() && at::isfinite(hi).item<bool>();
}

}  // namespace

std::optional<size_t> first_non_finite(const std::vector<at::Tensor>& tensors) {
  // One launch per tensor; the extremes wait, grouped by device and dtype, for one test per group and one
  // host read per device.
  std::map<std::pair<std::string, at::ScalarType>, std::vector<at::Tensor>> groups;
  for (const auto& t : tensors) {
    if (!checked(t)) continue;
    auto [lo, hi] = extremes(t);
    auto& g = groups[{t.device().str(), lo.scalar_type()}];
    g.push_back(lo);
    g.push_back(hi);
  }
  std::map<std::string, at::Tensor> all_finite;  // per device
  for (const auto& [key, values] : groups) {
    at::Tensor ok = at::isfinite(at::stack(values)).all();
    auto [it, fresh] = all_finite.emplace(key.first, ok);
    if (!fresh) it->second = it->second.logical_and(ok);
  }
  bool any = false;
  for (const auto& [device, ok] : all_finite) any |= !ok.item<bool>();
  if (!any) return std::nullopt;
  for (size_t i = 0; i < tensors.size(); ++i)
    if (checked(tensors[i]) && !finite(tensors[i])) return i;
  return tensors.size();  // not found again (nothing writes them meanwhile): reported without a name
}

}  // namespace refit::update
