// Strict loading of a checkpoint component into a model's registry, and random initialisation for
// `refit make-model`.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "pipeline/models/tensor_registry.hpp"
#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::weights {
class device_loader;
}

namespace refit::models {

class layer_offload;

struct placement {
  c10::ScalarType float_dtype = at::kFloat;  // floating parameters and buffers are held in this dtype
  at::Device device = at::kCPU;
};

// Checks, from headers alone, that `weights` provides exactly the registry's tensors with the
// expected shapes and convertible dtypes. Throws weight_error naming the module and tensor.
void validate_against(const tensor_registry& registry, const weights::module_weights& weights);

// Validates, reads and places every tensor: after it returns, every slot holds its checkpoint tensor.
// On a CUDA device, `loader` (the GPU fast path) reads straight into freshly allocated device tensors.
// With `offload`, the slots it holds are read into its host store instead and stay off the device.
void load_into(tensor_registry& registry, const weights::module_weights& weights, const placement& where,
               weights::device_loader* loader = nullptr, layer_offload* offload = nullptr);

// A deterministic random value for one slot, depending only on the seed and the slot's name (so a
// checkpoint is the same whatever order or thread makes it): normal * std for weights, 1 + that for
// norm scales (1-D ".weight"), |normal| + 1 for running_var, zeros for integer buffers.
at::Tensor random_value(const tensor_slot& slot, uint64_t seed, c10::ScalarType float_dtype, double std = 0.02);

// Fills every slot with random_value, for tests.
void init_random(tensor_registry& registry, uint64_t seed, const placement& where, double std = 0.02);

}  // namespace refit::models
