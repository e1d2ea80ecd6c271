#include "pipeline/models/layers.hpp"

#include <ATen/ATen.h>

#include <vector>

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

// PyTorch's CUDA group norm reduces each (sample, group) in one thread block: 32 blocks for the 134 M values of a
// 1024 x 1024 VAE activation, 45 ms of a 0.42 s FLUX.2-klein image on an H200 (bench/RESULTS.md). Here every pass
// spreads over the whole device: the group means (accumulated in float straight from the stored dtype), the
// deviations from them (in the stored dtype: rounded relative to the deviation), their sum of squares (in float),
// then one multiply-add per value in float, written in x's dtype. Two passes, so no cancellation when a group's
// mean is large against its spread; the mean's rounding to x's dtype is corrected exactly (E[d]^2 below).
at::Tensor group_norm::operator()(const at::Tensor& x) const {
  const int64_t B = x.size(0), C = x.size(1), per_group = C / groups;
  const at::Tensor grouped = x.reshape({B, groups, -1});
  const double n = static_cast<double>(grouped.size(2));
  const at::Tensor mean = at::sum(grouped, {-1}, /*keepdim=*/true, at::kFloat) / n;  // [B, G, 1]
  const at::Tensor center = mean.to(x.scalar_type());
  const at::Tensor spread = at::linalg_vector_norm(grouped - center, 2, {-1}, /*keepdim=*/true, at::kFloat);
  const at::Tensor offset = mean - center.to(at::kFloat);  // E[x - center]
  const at::Tensor var = (spread.square() / n - offset.square()).clamp_min(0);
  const at::Tensor scale = at::rsqrt(var + eps) * weight.to(at::kFloat).view({1, groups, per_group});  // [B, G, C/G]
  const at::Tensor shift = bias.to(at::kFloat).view({1, groups, per_group}) - mean * scale;
  std::vector<int64_t> per_channel{B, C};
  per_channel.resize(static_cast<size_t>(x.dim()), 1);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::addcmul_out(out, shift.reshape(per_channel), x, scale.reshape(per_channel));
  return out;
}

at::Tensor layer_norm_no_affine(const at::Tensor& x, double eps) {
  return at::layer_norm(x, {x.size(-1)}, std::nullopt, std::nullopt, eps);
}

}  // namespace refit::models
