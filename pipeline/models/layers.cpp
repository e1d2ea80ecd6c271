#include "pipeline/models/layers.hpp"

#include <ATen/ATen.h>

namespace refit::models {

void linear::bind(const registry_scope& s) {
  s.param("weight", weight, {out_features, in_features});
  if (has_bias) s.param("bias", bias, {out_features});
}

at::Tensor linear::operator()(const at::Tensor& x) const {
  return at::linear(x, weight, has_bias ? std::optional<at::Tensor>(bias) : std::nullopt);
}

void rms_norm::bind(const registry_scope& s) { s.param("weight", weight, {dim}); }

at::Tensor rms_norm::operator()(const at::Tensor& x) const {
  const auto in_dtype = x.scalar_type();
  at::Tensor h = x.to(at::kFloat);
  at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(in_dtype);
}

void conv2d::bind(const registry_scope& s) {
  s.param("weight", weight, {out_channels, in_channels, kernel, kernel});
  if (has_bias) s.param("bias", bias, {out_channels});
}

at::Tensor conv2d::operator()(const at::Tensor& x) const {
  return at::conv2d(x, weight, has_bias ? std::optional<at::Tensor>(bias) : std::nullopt, {stride, stride}, {padding, padding});
}

void group_norm::bind(const registry_scope& s) {
  s.param("weight", weight, {channels});
  s.param("bias", bias, {channels});
}

at::Tensor group_norm::operator()(const at::Tensor& x) const { return at::group_norm(x, groups, weight, bias, eps); }

at::Tensor layer_norm_no_affine(const at::Tensor& x, double eps) {
  return at::layer_norm(x, {x.size(-1)}, std::nullopt, std::nullopt, eps);
}

}  // namespace refit::models
