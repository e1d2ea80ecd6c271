// Building blocks shared by the model files. Each holds its tensors as members and binds them into a
// registry scope under the checkpoint's names; forward passes use ATen ops directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "pipeline/models/tensor_registry.hpp"

namespace refit::models {

struct linear {
  int64_t in_features = 0, out_features = 0;
  bool has_bias = false;
  at::Tensor weight, bias;  // [out, in], [out]

  linear() = default;
  linear(int64_t in, int64_t out, bool bias) : in_features(in), out_features(out), has_bias(bias) {}
  void bind(const registry_scope& s);
  at::Tensor operator()(const at::Tensor& x) const;
};

// RMSNorm with a learnable scale, computed in float32 and cast back (as Diffusers and Transformers do).
struct rms_norm {
  int64_t dim = 0;
  double eps = 1e-6;
  at::Tensor weight;

  rms_norm() = default;
  rms_norm(int64_t d, double e) : dim(d), eps(e) {}
  void bind(const registry_scope& s);
  at::Tensor operator()(const at::Tensor& x) const;
};

struct conv2d {
  int64_t in_channels = 0, out_channels = 0, kernel = 1, stride = 1, padding = 0;
  bool has_bias = true;
  at::Tensor weight, bias;

  conv2d() = default;
  conv2d(int64_t in, int64_t out, int64_t k, int64_t s, int64_t p, bool b = true)
      : in_channels(in), out_channels(out), kernel(k), stride(s), padding(p), has_bias(b) {}
  void bind(const registry_scope& s);
  at::Tensor operator()(const at::Tensor& x) const;
};

struct group_norm {
  int64_t groups = 32, channels = 0;
  double eps = 1e-6;
  at::Tensor weight, bias;

  group_norm() = default;
  group_norm(int64_t g, int64_t c, double e) : groups(g), channels(c), eps(e) {}
  void bind(const registry_scope& s);
  at::Tensor operator()(const at::Tensor& x) const;
};

// LayerNorm over the last dimension without learnable parameters.
at::Tensor layer_norm_no_affine(const at::Tensor& x, double eps);

}  // namespace refit::models
