// Strict loading of a checkpoint component into a model's registry, and random initialisation for
// `refit make-model`.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "pipeline/models/placement.hpp"
#include "pipeline/models/tensor_registry.hpp"
#include "pipeline/weights/diffusers_layout.hpp"
#include "pipeline/weights/host_loader.hpp"

namespace refit::weights {
class device_loader;
}

namespace refit::models {

class layer_offload;

// Checks, from headers alone, that `weights` provides exactly the registry's tensors with the
// expected shapes and convertible dtypes. Throws weight_error naming the module and tensor.
void validate_against(const tensor_registry& registry, const weights::module_weights& weights);

// The tensors that hold a module's values, one per registry slot: the host store's for slots `offload`
// holds (what an update writes and a checksum covers), the model's members for the rest.
std::vector<at::Tensor> held_tensors(const tensor_registry& registry, const layer_offload* offload);

// The dtype a slot is held in: its fixed dtype, else the placement's floating dtype.
c10::ScalarType held_dtype(const tensor_slot& slot, const placement& where);

// Reads the named tensors of `weights` into existing contiguous tensors of their held shape and dtype
// (floats converted to the placement's dtype). The one place that picks a reader: host tensors through
// the host loader, device tensors through `loader` (the GPU fast path) when given, else through host
// memory. Every destination is written before it returns. `replicas` (one list per destination, device
// destinations through `loader` only): more copies on other GPUs, filled from the same staging slots.
void read_checkpoint(const weights::module_weights& weights, const weights::named_tensors& destinations, const placement& where,
                     weights::device_loader* loader = nullptr, const std::vector<std::vector<at::Tensor>>* replicas = nullptr);

// Validates, reads and places every tensor: after it returns, every slot holds its checkpoint tensor.
// Tensors are allocated where they are held (on the device, or in `offload`'s host store for the slots it
// holds) and filled by read_checkpoint.
void load_into(tensor_registry& registry, const weights::module_weights& weights, const placement& where,
               weights::device_loader* loader = nullptr, layer_offload* offload = nullptr);

// A deterministic random value for one slot, depending only on the seed and the slot's name (so a
// checkpoint is the same whatever order or thread makes it): normal * std for weights, 1 + that for
// norm scales (1-D ".weight"), |normal| + 1 for running_var, zeros for integer buffers.
at::Tensor random_value(const tensor_slot& slot, uint64_t seed, c10::ScalarType float_dtype, double std = 0.02);

// Fills every slot with random_value, for tests.
void init_random(tensor_registry& registry, uint64_t seed, const placement& where, double std = 0.02);

}  // namespace refit::models
